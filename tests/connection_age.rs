//! `server.max_connection_age_s`: old connections get a graceful GOAWAY and close, so clients that
//! balance over a headless Service re-resolve DNS and find replicas added since they connected.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;

/// Opens a bare HTTP/2 connection and returns how long the server kept it open (None: still open at `limit`).
async fn connection_lifetime(addr: &str, limit: Duration) -> Option<Duration> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (_client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    let started = Instant::now();
    match tokio::time::timeout(limit, connection).await {
        Ok(_) => Some(started.elapsed()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn connections_older_than_the_limit_are_closed_and_younger_ones_are_not() {
    let aged = TestServer::start(&[("ADAPTERDROP__SERVER__MAX_CONNECTION_AGE_S", "1")]);
    let lived = connection_lifetime(&aged.addr, Duration::from_secs(15)).await.expect("the server closed the connection");
    assert!(lived >= Duration::from_millis(900), "closed after {lived:?}, before the 1 s age");
    let forever = TestServer::start(&[("ADAPTERDROP__SERVER__MAX_CONNECTION_AGE_S", "0")]);
    assert_eq!(connection_lifetime(&forever.addr, Duration::from_secs(3)).await, None, "0 must mean no limit");
    // Clients reconnect transparently: a channel keeps working across the age limit.
    let mut c = aged.client().await;
    for _ in 0..3 {
        c.list_tasks(adapterdrop_serve::proto::ListTasksRequest {}).await.expect("served across reconnects");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}
