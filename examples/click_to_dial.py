"""Click-to-dial from Python: `pip install nats-py`, then
`python3 examples/click_to_dial.py sip:alice@example.com sip:bob@example.com`."""
import asyncio, json, os, sys
import nats

async def main(caller, callee):
    nc = await nats.connect(os.environ.get("CALLBUS_NATS", "nats://127.0.0.1:4222"))
    notes = await nc.subscribe("callbus.call.>")  # before the command: no notification is missed
    reply = json.loads((await nc.request("callbus.cmd.call.start",
                                         json.dumps({"caller": caller, "callee": callee}).encode(), timeout=5)).data)
    if "error" in reply:
        sys.exit(f"refused: {reply['error']['message']}")
    async for msg in notes.messages:
        note = json.loads(msg.data)
        if note["call_id"] == reply["call_id"]:
            print(note["event"], note["state"], json.dumps(note["data"]))
            if note["event"] in ("command_succeeded", "command_failed"):
                break
    await nc.request("callbus.cmd.call.end", json.dumps({"call_id": reply["call_id"]}).encode(), timeout=5)
    await nc.close()
    return note["event"] == "command_succeeded"

ok = asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), timeout=200))
sys.exit(0 if ok else 1)
