//! The harness starts a real nats-server per test, on its own port, and kills it on drop.

use std::time::Duration;

use callbus_tests::NatsServer;
use futures::StreamExt;

#[tokio::test]
async fn each_test_gets_its_own_working_nats_server() {
    let a = NatsServer::start();
    let b = NatsServer::start();
    assert_ne!(a.url(), b.url());
    let client = async_nats::connect(a.url()).await.expect("connect");
    let mut sub = client.subscribe("harness.check").await.expect("subscribe");
    client.publish("harness.check", "hello".into()).await.expect("publish");
    let msg = tokio::time::timeout(Duration::from_secs(2), sub.next()).await.expect("message").expect("stream open");
    assert_eq!(&msg.payload[..], b"hello");
}

#[tokio::test]
async fn a_killed_server_stops_answering_and_restarts_on_the_same_port() {
    let mut server = NatsServer::start();
    let addr = server.addr();
    server.kill();
    assert!(std::net::TcpStream::connect(addr).is_err(), "killed server must be gone");
    server.restart();
    assert_eq!(server.addr(), addr);
    assert!(async_nats::connect(server.url()).await.is_ok());
    drop(server);
    assert!(std::net::TcpStream::connect(addr).is_err(), "dropped server must be gone");
}
