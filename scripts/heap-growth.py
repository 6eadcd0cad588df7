#!/usr/bin/env python3
"""What grew in the heap between two heaptrack runs of the same program, by call site.

Run the program under heaptrack twice and stop each with `kill -9` at a different minute (a
program that ends by itself frees everything, so nothing shows as left), then:

    heaptrack_print -f early.zst --flamegraph-cost-type leaked -F early.txt
    heaptrack_print -f late.zst --flamegraph-cost-type leaked -F late.txt
    python3 scripts/heap-growth.py late.txt early.txt [frames]

Prints the call sites whose live bytes differ most (late − early, in KiB), each named by its
innermost `frames` frames (2 by default) outside the standard library's containers.
"""
import collections
import re
import sys

# Frames that say where memory is held, not who holds it.
GENERIC = {
    'alloc.rs', 'mod.rs', 'raw_vec.rs', 'boxed.rs', 'vec.rs', 'string.rs', 'slice.rs', 'str.rs',
    'sync.rs', 'rc.rs', 'map.rs', 'set.rs', 'raw.rs', 'spec_from_elem.rs', 'spec_extend.rs',
    'option.rs', 'result.rs', 'function.rs', 'ops.rs', 'iter.rs', 'macros.rs', 'borrow.rs',
    'clone.rs', 'cell.rs', 'ptr.rs', 'lazy.rs', 'once_lock.rs', 'repeat_with.rs',
}


def site(stack, depth):
    kept = []
    for frame in reversed([f for f in stack.split(';') if f]):
        m = re.match(r'(.*) \(([^)]*)\)$', frame)
        if not m:
            continue
        function, file = m.groups()
        if file in GENERIC or file.endswith('.c'):
            # A C library's own allocation is named by its innermost frame.
            if file.endswith('.c') and not kept:
                kept.append(f'{function} ({file})')
            continue
        kept.append(f'{function} ({file})')
        if len(kept) >= depth:
            break
    return ' < '.join(kept) or 'other'


def load(path, depth):
    bytes_by_site = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(' ')
            if n.isdigit():
                bytes_by_site[site(stack, depth)] += int(n)
    return bytes_by_site


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    depth = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    late, early = load(sys.argv[1], depth), load(sys.argv[2], depth)
    print(f'live: {sum(early.values()) / 1048576:.2f} MiB then {sum(late.values()) / 1048576:.2f} MiB')
    diff = {k: late[k] - early[k] for k in set(late) | set(early)}
    for k, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:25]:
        print(f'{d / 1024:9.1f} KiB ({early[k] / 1024:8.1f} → {late[k] / 1024:8.1f})  {k[:200]}')


if __name__ == '__main__':
    main()
