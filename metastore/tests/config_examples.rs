//! The shipped example configs parse and validate.

use magnetar_common::config::ConfigLoader;
use magnetar_metastore::MetastoreConfig;

#[test]
fn metastore_example_parses_and_validates() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/metastore.toml");
    let cfg: MetastoreConfig =
        ConfigLoader::new("MAGNETAR_METASTORE_").file(Some(&path)).load_with_env(&[]).expect("example config loads");
    assert_eq!(cfg.members().expect("members").len(), 3);
    assert_eq!(cfg.advertise_addr, "meta-1.example.internal:2379");
    assert_eq!(cfg.limits.max_value_bytes, 1 << 20);
}

#[test]
fn layers_override_in_order_and_bad_keys_are_named() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/metastore.toml");
    let env = vec![("MAGNETAR_METASTORE_RAFT__HEARTBEAT_MS".to_string(), "50".to_string())];
    let cfg: MetastoreConfig = ConfigLoader::new("MAGNETAR_METASTORE_")
        .file(Some(&path))
        .set("node_id", "2")
        .load_with_env(&env)
        .expect("loads");
    assert_eq!(cfg.raft.heartbeat_ms, 50);
    assert_eq!(cfg.node_id, 2);
    let err = ConfigLoader::new("MAGNETAR_METASTORE_")
        .set("raft.heartbeat_ms", "0")
        .load_with_env::<MetastoreConfig>(&[])
        .expect_err("invalid");
    assert!(err.to_string().contains("raft.heartbeat_ms"), "{err}");
    let err = ConfigLoader::new("MAGNETAR_METASTORE_")
        .load_with_env::<MetastoreConfig>(&[("MAGNETAR_METASTORE_RAFT__HEARTBEAT".into(), "1".into())])
        .expect_err("typo");
    assert!(err.to_string().contains("MAGNETAR_METASTORE_RAFT__HEARTBEAT"), "{err}");
}
