//! A recorded history of concurrent puts, compare-and-sets and reads on a few keys, taken while
//! the leader is repeatedly SIGKILLed and restarted, is linearizable per key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use magnetar_metastore::client::{ClientError, ClientOptions, MetaClient, PutOptions};

use crate::linearizability::{check_by_key, Event, Op, Outcome};
use crate::support::cluster;

const KEYS: [&str; 3] = ["/lin/a", "/lin/b", "/lin/c"];

fn parse(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[tokio::test]
async fn history_under_leader_kills_is_linearizable() {
    let mut t = cluster(3, &[]).await;
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for cid in 0..6usize {
        let opts = ClientOptions { request_timeout: Duration::from_secs(6), ..Default::default() };
        let client = MetaClient::new(&t.c.endpoints(), opts).expect("client");
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut history: Vec<(String, Event)> = Vec::new();
            // Last observed (version, value) per key, for CAS preconditions.
            let mut seen: HashMap<&str, (u64, Option<u64>)> = HashMap::new();
            let mut counter = 0u64;
            let mut rng = rand_seed(cid as u64 + 1);
            // Bounded, paced load: enough operations around each failover to judge, few enough
            // per key for the checker.
            while !stop.load(Ordering::Relaxed) && history.len() < 300 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let key = KEYS[(next(&mut rng) % 3) as usize];
                let dice = next(&mut rng) % 10;
                let invoked = start.elapsed().as_nanos() as u64;
                let (op, outcome) = if dice < 4 {
                    let r = client.get(key).await;
                    let outcome = match &r {
                        Ok(Some(kv)) => {
                            seen.insert(key, (kv.version, parse(&kv.value)));
                            Outcome::ReadValue(parse(&kv.value))
                        }
                        Ok(None) => {
                            seen.insert(key, (0, None));
                            Outcome::ReadValue(None)
                        }
                        Err(_) => Outcome::Unknown,
                    };
                    (Op::Read, outcome)
                } else {
                    counter += 1;
                    let value = ((cid as u64 + 1) << 32) | counter;
                    if dice < 7 {
                        let r = client.put(key, value.to_string(), PutOptions::default()).await;
                        (Op::Write { value }, if r.is_ok() { Outcome::WriteOk } else { Outcome::Unknown })
                    } else {
                        let (version, expected) = seen.get(key).copied().unwrap_or((0, None));
                        let r = client
                            .put(key, value.to_string(), PutOptions { expected_version: Some(version), session: 0 })
                            .await;
                        let outcome = match r {
                            Ok(_) => Outcome::CasResult(true),
                            Err(ClientError::BadVersion { .. }) => Outcome::CasResult(false),
                            Err(_) => Outcome::Unknown,
                        };
                        (Op::Cas { expected, new: value }, outcome)
                    }
                };
                let completed = start.elapsed().as_nanos() as u64;
                history.push((key.to_string(), Event { client: cid, op, outcome, invoked, completed }));
            }
            history
        }));
    }
    // Chaos: kill the leader, restart it a second later, three times.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = t.leader().await;
        t.c.kill(leader);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        t.c.restart(leader).expect("restart");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut history = Vec::new();
    for c in clients {
        history.extend(c.await.expect("client task"));
    }
    let known = history.iter().filter(|(_, e)| e.outcome != Outcome::Unknown).count();
    assert!(known > 300, "too few completed operations to judge: {known}");
    if let Err(e) = check_by_key(&history) {
        panic!("history is not linearizable: {e}\n{}", t.logs());
    }
}

fn rand_seed(s: u64) -> u64 {
    s.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

fn next(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}
