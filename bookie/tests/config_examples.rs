//! The shipped bookie config parses and validates, and the layers apply in order.

use magnetar_bookie::BookieConfig;
use magnetar_common::config::ConfigLoader;

fn example() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/bookie.toml")
}

#[test]
fn bookie_example_parses_and_validates() {
    let cfg: BookieConfig =
        ConfigLoader::new("MAGNETAR_BOOKIE_").file(Some(&example())).load_with_env(&[]).expect("example config loads");
    assert_eq!(cfg.bookie_id, "bookie-1");
    assert_eq!(cfg.metastore.len(), 3);
    assert_eq!(cfg.journal.segment_bytes, 64 << 20);
    assert!(cfg.journal.sync);
}

#[test]
fn env_and_bookkeeper_names_override_the_file() {
    let path = example();
    let mut loader = ConfigLoader::new("MAGNETAR_BOOKIE_").file(Some(&path));
    for (env, key) in magnetar_bookie::config::ENV_ALIASES {
        loader = loader.env_alias(env, key);
    }
    let env = vec![
        ("MAGNETAR_BOOKIE_JOURNAL__MAX_GROUP_WAIT_US".to_string(), "250".to_string()),
        ("diskUsageThreshold".to_string(), "0.8".to_string()),
        ("diskUsageLwmThreshold".to_string(), "0.7".to_string()),
    ];
    let cfg: BookieConfig = loader.set("gc_interval_ms", "5000").load_with_env(&env).expect("loads");
    assert_eq!(cfg.journal.max_group_wait_us, 250);
    assert_eq!((cfg.disk_usage_threshold, cfg.disk_usage_lwm_threshold), (0.8, 0.7));
    assert_eq!(cfg.gc_interval_ms, 5000);
    let err = ConfigLoader::new("MAGNETAR_BOOKIE_")
        .set("journal.segment_bytes", "1024")
        .load_with_env::<BookieConfig>(&[])
        .expect_err("too small");
    assert!(err.to_string().contains("journal.segment_bytes"), "{err}");
}
