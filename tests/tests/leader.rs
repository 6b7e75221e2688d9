//! Leader election on a Lease against a real etcd and seine-apiserver: one leader at a time, a
//! replica taking over when the leader stops renewing (a crash) or gives the Lease up (a graceful
//! stop), and the Lease as kubectl shows it.

use std::time::{Duration, Instant};

use seine_component_base::leader::{Elector, LeaderConfig};
use seine_tests::{apiserver::ApiServer, etcd::Etcd};

fn config(identity: &str) -> LeaderConfig {
    LeaderConfig {
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1500),
        retry_period: Duration::from_millis(200),
        ..LeaderConfig::new("seine-test-manager", identity)
    }
}

/// The Lease's holder and transitions as kubectl shows them.
fn holder(api: &ApiServer) -> String {
    api.kubectl_ok(&[
        "get",
        "lease",
        "-n",
        "kube-system",
        "seine-test-manager",
        "-o",
        "jsonpath={.spec.holderIdentity} {.spec.leaseTransitions}",
    ])
    .unwrap()
    .trim()
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_a_replica_takes_over() {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    let a = std::sync::Arc::new(Elector::new(api.kube_client().await, config("replica-a")));
    let b = std::sync::Arc::new(Elector::new(api.kube_client().await, config("replica-b")));

    assert!(
        a.try_acquire_or_renew().await.unwrap(),
        "the first creates the lease"
    );
    assert!(!b.try_acquire_or_renew().await.unwrap(), "the second waits");
    assert!(a.try_acquire_or_renew().await.unwrap(), "the leader renews");

    // A renews in the background; B keeps trying for longer than the lease duration and loses.
    let holding = tokio::spawn({
        let a = a.clone();
        async move { a.hold().await }
    });
    let waiting = tokio::time::timeout(Duration::from_secs(4), b.acquire()).await;
    assert!(waiting.is_err(), "B must not lead while A renews");

    // A crashes (stops renewing without giving the lease up): B takes over after the lease
    // duration, as it observed it.
    holding.abort();
    let crashed = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), b.acquire())
        .await
        .expect("B takes over");
    let took = crashed.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "not before the lease ran out: {took:?}"
    );
    assert_eq!(holder(&api), "replica-b 1");
    assert!(
        !a.try_acquire_or_renew().await.unwrap(),
        "A, back, is a follower"
    );

    // B stops gracefully: it gives the lease up and A leads at once.
    b.release().await.unwrap();
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&api), "replica-a 2");

    // A leader whose renewals fail (the API server frozen) gives leadership up within the
    // renew deadline instead of acting on a lease it may have lost.
    let pid = api.pid().unwrap().to_string();
    seine_tests::sh("kill", &["-STOP", &pid]).unwrap();
    let lost = tokio::time::timeout(Duration::from_secs(30), a.hold()).await;
    seine_tests::sh("kill", &["-CONT", &pid]).unwrap();
    assert!(
        lost.is_ok(),
        "hold returns once renewals fail past the deadline"
    );
}
