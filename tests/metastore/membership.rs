//! Runtime membership: grow a single node to three (learner, catch-up, promote), then remove a
//! voter, with data intact throughout.

use std::time::Duration;

use magnetar_metastore::client::PutOptions;

use crate::support::{cluster, wait_until};

#[tokio::test]
async fn add_learners_promote_and_remove() {
    let mut t = cluster(1, &[]).await;
    let c = t.c.client();
    for i in 0..50 {
        c.put(&format!("/m/{i}"), "v", PutOptions::default()).await.expect("put");
    }
    let two = t.c.spawn_joiner().expect("spawn node 2");
    let three = t.c.spawn_joiner().expect("spawn node 3");
    let status = c.cluster_add(2, &t.c.nodes[two].addr.clone(), true).await.expect("add 2");
    assert!(status.members.iter().any(|m| m.id == 2 && m.voter), "{status:?}");
    let status = c.cluster_add(3, &t.c.nodes[three].addr.clone(), false).await.expect("add 3 as learner");
    assert!(status.members.iter().any(|m| m.id == 3 && !m.voter), "{status:?}");
    let status = c.cluster_promote(3).await.expect("promote 3");
    assert_eq!(status.members.iter().filter(|m| m.voter).count(), 3, "{status:?}");

    // The new nodes hold the data written before they joined.
    let probe = magnetar_metastore::client::MetaClient::connect(&[t.c.nodes[three].addr.clone()]).expect("client");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let p = probe.clone();
            async move { p.get_with("/m/49", true).await.ok().flatten().is_some() }
        })
        .await
    );

    // Remove the original node; the remaining two carry on.
    let status = c.cluster_remove(1).await.expect("remove 1");
    assert!(!status.members.iter().any(|m| m.id == 1), "{status:?}");
    t.c.kill(0);
    let c2 =
        magnetar_metastore::client::MetaClient::connect(&[t.c.nodes[two].addr.clone(), t.c.nodes[three].addr.clone()])
            .expect("client");
    c2.put("/m/after", "v", PutOptions::default()).await.expect("write after removal");
    assert_eq!(c2.list("/m/").await.expect("list").len(), 51);
}
