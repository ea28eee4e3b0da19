//! `magnetar admin …`: the broker's admin REST API with pulsar-admin's verbs. Human output by
//! default, the API's JSON with `--json`.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The broker's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "MAGNETAR_ADMIN_URL")]
    url: String,
    /// Print the API's JSON as is.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Group,
}

#[derive(Subcommand, Debug)]
enum Group {
    /// Clusters.
    Clusters {
        #[command(subcommand)]
        cmd: ClustersCmd,
    },
    /// Brokers.
    Brokers {
        #[command(subcommand)]
        cmd: BrokersCmd,
    },
    /// Tenants.
    Tenants {
        #[command(subcommand)]
        cmd: TenantsCmd,
    },
    /// Namespaces.
    Namespaces {
        #[command(subcommand)]
        cmd: NamespacesCmd,
    },
    /// Topics.
    Topics {
        #[command(subcommand)]
        cmd: TopicsCmd,
    },
    /// Topic schemas.
    Schemas {
        #[command(subcommand)]
        cmd: SchemasCmd,
    },
}

#[derive(Subcommand, Debug)]
enum SchemasCmd {
    /// Show a topic's latest schema, or one version of it.
    Get {
        topic: String,
        #[arg(long)]
        version: Option<u64>,
    },
    /// Delete every version of a topic's schema.
    Delete { topic: String },
}

#[derive(Subcommand, Debug)]
enum ClustersCmd {
    /// List clusters.
    List,
    /// Show a cluster.
    Get { cluster: String },
}

#[derive(Subcommand, Debug)]
enum BrokersCmd {
    /// Check the broker answers.
    Healthcheck,
    /// Brokers of a cluster.
    List { cluster: String },
}

#[derive(Subcommand, Debug)]
enum TenantsCmd {
    /// List tenants.
    List,
    /// Create a tenant.
    Create {
        tenant: String,
        /// Admin roles, comma-separated.
        #[arg(long = "admin-roles", short = 'r', value_delimiter = ',')]
        admin_roles: Vec<String>,
        /// Allowed clusters, comma-separated.
        #[arg(long = "allowed-clusters", short = 'c', value_delimiter = ',')]
        allowed_clusters: Vec<String>,
    },
    /// Show a tenant.
    Get { tenant: String },
    /// Delete an empty tenant.
    Delete { tenant: String },
}

#[derive(Subcommand, Debug)]
enum NamespacesCmd {
    /// Namespaces of a tenant.
    List { tenant: String },
    /// Create `tenant/namespace`.
    Create { namespace: String },
    /// Policies of a namespace.
    Policies { namespace: String },
    /// Delete an empty namespace.
    Delete { namespace: String },
    /// Set the retention policy.
    SetRetention {
        namespace: String,
        /// Minutes (-1: forever).
        #[arg(long, allow_negative_numbers = true)]
        time: i64,
        /// MiB (-1: unlimited).
        #[arg(long, allow_negative_numbers = true)]
        size: i64,
    },
    /// Show the retention policy.
    GetRetention { namespace: String },
    /// Set the message TTL.
    SetMessageTtl {
        namespace: String,
        /// Seconds.
        #[arg(long)]
        ttl: u64,
    },
    /// Show the message TTL.
    GetMessageTtl { namespace: String },
    /// Set the backlog quota (the size quota, `destination_storage`).
    SetBacklogQuota {
        namespace: String,
        /// Bytes a subscription may leave unacknowledged (-1: no limit).
        #[arg(long, allow_negative_numbers = true)]
        limit: i64,
        /// producer_request_hold, producer_exception or consumer_backlog_eviction.
        #[arg(long, default_value = "producer_request_hold")]
        policy: String,
    },
    /// Show the backlog quotas.
    GetBacklogQuotas { namespace: String },
    /// Remove the backlog quota: the broker's default applies again.
    RemoveBacklogQuota { namespace: String },
    /// Turn deduplication on or off.
    SetDeduplication {
        namespace: String,
        #[arg(long)]
        enable: bool,
    },
    /// Grant a role actions on the namespace.
    GrantPermission {
        namespace: String,
        #[arg(long)]
        role: String,
        /// produce, consume, … (comma-separated).
        #[arg(long, value_delimiter = ',')]
        actions: Vec<String>,
    },
    /// Roles and their actions.
    Permissions { namespace: String },
}

#[derive(Subcommand, Debug)]
enum TopicsCmd {
    /// Topics of `tenant/namespace` (partitions included).
    List { namespace: String },
    /// Partitioned topics of `tenant/namespace`.
    ListPartitionedTopics { namespace: String },
    /// Create a non-partitioned topic.
    Create { topic: String },
    /// Create a partitioned topic.
    CreatePartitionedTopic {
        topic: String,
        #[arg(long, short = 'p')]
        partitions: u32,
    },
    /// Raise a partitioned topic's partition count.
    UpdatePartitionedTopic {
        topic: String,
        #[arg(long, short = 'p')]
        partitions: u32,
    },
    /// Partition count.
    GetPartitionedTopicMetadata { topic: String },
    /// Statistics of a topic.
    Stats { topic: String },
    /// Delete a topic with its cursors and ledgers.
    Delete {
        topic: String,
        /// Even with producers or consumers connected.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Set the topic's own message TTL, over its namespace's (0: none for this topic).
    SetMessageTtl {
        topic: String,
        /// Seconds.
        #[arg(long)]
        ttl: u64,
    },
    /// Show the topic's own message TTL (`null`: its namespace's applies).
    GetMessageTtl {
        topic: String,
        /// The TTL in effect: the topic's, its partitioned topic's, its namespace's or the
        /// broker's default.
        #[arg(long, visible_alias = "ap")]
        applied: bool,
    },
    /// Remove the topic's own message TTL: its namespace's applies again.
    RemoveMessageTtl { topic: String },
    /// Turn deduplication on or off for the topic, over its namespace's policy.
    SetDeduplication {
        topic: String,
        #[arg(long, conflicts_with = "disable", required_unless_present = "disable")]
        enable: bool,
        #[arg(long)]
        disable: bool,
    },
    /// Show the topic's own deduplication policy (`null`: its namespace's applies).
    GetDeduplication {
        topic: String,
        /// The policy in effect: the topic's, its partitioned topic's, its namespace's or the
        /// broker's default.
        #[arg(long, visible_alias = "ap")]
        applied: bool,
    },
    /// Remove the topic's own deduplication policy.
    RemoveDeduplication { topic: String },
    /// Delete a partitioned topic and its partitions.
    DeletePartitionedTopic {
        topic: String,
        /// Even with producers or consumers connected.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Statistics of a partitioned topic.
    PartitionedStats { topic: String },
    /// Ledgers and cursors of a topic.
    InternalStats { topic: String },
    /// The last message id.
    LastMessageId { topic: String },
    /// Close the topic here; it loads again on next use.
    Unload { topic: String },
    /// Accept no more messages.
    Terminate { topic: String },
    /// Subscriptions of a topic.
    Subscriptions { topic: String },
    /// Create a subscription.
    CreateSubscription {
        topic: String,
        #[arg(long, short = 's')]
        subscription: String,
        /// earliest or latest.
        #[arg(long = "messageId", short = 'm', default_value = "latest")]
        position: String,
    },
    /// Delete a subscription.
    Unsubscribe {
        topic: String,
        #[arg(long, short = 's')]
        subscription: String,
        /// Even with consumers connected.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Acknowledge the next N messages.
    Skip {
        topic: String,
        #[arg(long, short = 's')]
        subscription: String,
        #[arg(long, short = 'n')]
        count: u64,
    },
    /// Acknowledge everything.
    SkipAll {
        topic: String,
        #[arg(long, short = 's')]
        subscription: String,
    },
    /// Acknowledge messages older than the given seconds.
    ExpireMessages {
        topic: String,
        #[arg(long, short = 's')]
        subscription: String,
        #[arg(long = "expireTime", short = 't')]
        seconds: u64,
    },
    /// Move a subscription to a publish time (ms since the epoch).
    ResetCursor {
        topic: String,
        #[arg(long, short = 's')]
        subscription: String,
        #[arg(long, short = 't')]
        time: u64,
    },
    /// Show the next unacknowledged messages.
    PeekMessages {
        topic: String,
        #[arg(long, short = 's')]
        subscription: String,
        #[arg(long = "count", short = 'n', default_value_t = 1)]
        count: u64,
    },
}

/// `persistent://t/ns/x`, `t/ns/x` or `x` → `t/ns/x`.
fn topic_path(topic: &str) -> anyhow::Result<String> {
    let n = magnetar_broker::protocol::names::TopicName::parse(topic).map_err(|e| anyhow::anyhow!("{e}"))?;
    if n.domain != "persistent" {
        bail!("only persistent topics are served");
    }
    Ok(format!("{}/{}/{}", n.tenant, n.namespace, n.local))
}

fn namespace_path(ns: &str) -> anyhow::Result<&str> {
    match ns.split('/').collect::<Vec<_>>().as_slice() {
        [t, n] if !t.is_empty() && !n.is_empty() => Ok(ns),
        _ => bail!("expected tenant/namespace, got {ns}"),
    }
}

/// Calls the API; an error status becomes an error with the API's reason.
async fn call(base: &str, method: &str, path: &str, body: &str) -> anyhow::Result<String> {
    let r = magnetar_broker::http::request_following(base, method, path, body)
        .await
        .with_context(|| format!("{method} {path} at {base}"))?;
    let (status, text) = (r.status, r.body);
    if !(200..300).contains(&status) {
        let reason = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["reason"].as_str().map(String::from))
            .unwrap_or(text);
        bail!("{status}: {reason}");
    }
    Ok(text)
}

fn print(json: bool, text: &str) {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => {
            println!("{text}");
            return;
        }
    };
    if json {
        println!("{text}");
        return;
    }
    match &v {
        Value::Array(items) => {
            for i in items {
                println!("{}", i.as_str().map(String::from).unwrap_or_else(|| i.to_string()));
            }
        }
        _ => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
    }
}

pub async fn run(a: AdminArgs) -> anyhow::Result<()> {
    let u = a.url.as_str();
    if let Group::Topics { cmd: TopicsCmd::PeekMessages { topic, subscription, count } } = &a.cmd {
        for i in 1..=*count {
            let path = format!("/admin/v2/persistent/{}/subscription/{subscription}/position/{i}", topic_path(topic)?);
            match call(u, "GET", &path, "").await {
                Ok(text) => println!("{text}"),
                Err(e) if i > 1 && e.to_string().starts_with("404") => break,
                Err(e) => return Err(e),
            }
        }
        return Ok(());
    }
    let (method, path, body): (&str, String, String) = match &a.cmd {
        Group::Clusters { cmd: ClustersCmd::List } => ("GET", "/admin/v2/clusters".into(), String::new()),
        Group::Clusters { cmd: ClustersCmd::Get { cluster } } => {
            ("GET", format!("/admin/v2/clusters/{cluster}"), String::new())
        }
        Group::Brokers { cmd: BrokersCmd::Healthcheck } => ("GET", "/admin/v2/brokers/health".into(), String::new()),
        Group::Brokers { cmd: BrokersCmd::List { cluster } } => {
            ("GET", format!("/admin/v2/brokers/{cluster}"), String::new())
        }
        Group::Tenants { cmd: TenantsCmd::List } => ("GET", "/admin/v2/tenants".into(), String::new()),
        Group::Tenants { cmd: TenantsCmd::Create { tenant, admin_roles, allowed_clusters } } => (
            "PUT",
            format!("/admin/v2/tenants/{tenant}"),
            serde_json::json!({ "adminRoles": admin_roles, "allowedClusters": allowed_clusters }).to_string(),
        ),
        Group::Tenants { cmd: TenantsCmd::Get { tenant } } => {
            ("GET", format!("/admin/v2/tenants/{tenant}"), String::new())
        }
        Group::Tenants { cmd: TenantsCmd::Delete { tenant } } => {
            ("DELETE", format!("/admin/v2/tenants/{tenant}"), String::new())
        }
        Group::Namespaces { cmd: NamespacesCmd::List { tenant } } => {
            ("GET", format!("/admin/v2/namespaces/{tenant}"), String::new())
        }
        Group::Namespaces { cmd: NamespacesCmd::Create { namespace } } => {
            ("PUT", format!("/admin/v2/namespaces/{}", namespace_path(namespace)?), String::new())
        }
        Group::Namespaces { cmd: NamespacesCmd::Policies { namespace } } => {
            ("GET", format!("/admin/v2/namespaces/{}", namespace_path(namespace)?), String::new())
        }
        Group::Namespaces { cmd: NamespacesCmd::Delete { namespace } } => {
            ("DELETE", format!("/admin/v2/namespaces/{}", namespace_path(namespace)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::List { namespace } } => {
            ("GET", format!("/admin/v2/persistent/{}", namespace_path(namespace)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::ListPartitionedTopics { namespace } } => {
            ("GET", format!("/admin/v2/persistent/{}/partitioned", namespace_path(namespace)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::Create { topic } } => {
            ("PUT", format!("/admin/v2/persistent/{}", topic_path(topic)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::CreatePartitionedTopic { topic, partitions } } => {
            ("PUT", format!("/admin/v2/persistent/{}/partitions", topic_path(topic)?), partitions.to_string())
        }
        Group::Topics { cmd: TopicsCmd::UpdatePartitionedTopic { topic, partitions } } => {
            ("POST", format!("/admin/v2/persistent/{}/partitions", topic_path(topic)?), partitions.to_string())
        }
        Group::Topics { cmd: TopicsCmd::GetPartitionedTopicMetadata { topic } } => {
            ("GET", format!("/admin/v2/persistent/{}/partitions", topic_path(topic)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::Delete { topic, force } } => (
            "DELETE",
            format!("/admin/v2/persistent/{}{}", topic_path(topic)?, if *force { "?force=true" } else { "" }),
            String::new(),
        ),
        Group::Topics { cmd: TopicsCmd::DeletePartitionedTopic { topic, force } } => (
            "DELETE",
            format!(
                "/admin/v2/persistent/{}/partitions{}",
                topic_path(topic)?,
                if *force { "?force=true" } else { "" }
            ),
            String::new(),
        ),
        Group::Namespaces { cmd: NamespacesCmd::SetRetention { namespace, time, size } } => (
            "POST",
            format!("/admin/v2/namespaces/{}/retention", namespace_path(namespace)?),
            serde_json::json!({ "retentionTimeInMinutes": time, "retentionSizeInMB": size }).to_string(),
        ),
        Group::Namespaces { cmd: NamespacesCmd::GetRetention { namespace } } => {
            ("GET", format!("/admin/v2/namespaces/{}/retention", namespace_path(namespace)?), String::new())
        }
        Group::Namespaces { cmd: NamespacesCmd::SetMessageTtl { namespace, ttl } } => {
            ("POST", format!("/admin/v2/namespaces/{}/messageTTL", namespace_path(namespace)?), ttl.to_string())
        }
        Group::Namespaces { cmd: NamespacesCmd::GetMessageTtl { namespace } } => {
            ("GET", format!("/admin/v2/namespaces/{}/messageTTL", namespace_path(namespace)?), String::new())
        }
        Group::Namespaces { cmd: NamespacesCmd::SetBacklogQuota { namespace, limit, policy } } => (
            "POST",
            format!(
                "/admin/v2/namespaces/{}/backlogQuota?backlogQuotaType=destination_storage",
                namespace_path(namespace)?
            ),
            serde_json::json!({ "limitSize": limit, "limitTime": -1, "policy": policy }).to_string(),
        ),
        Group::Namespaces { cmd: NamespacesCmd::GetBacklogQuotas { namespace } } => {
            ("GET", format!("/admin/v2/namespaces/{}/backlogQuotaMap", namespace_path(namespace)?), String::new())
        }
        Group::Namespaces { cmd: NamespacesCmd::RemoveBacklogQuota { namespace } } => (
            "DELETE",
            format!(
                "/admin/v2/namespaces/{}/backlogQuota?backlogQuotaType=destination_storage",
                namespace_path(namespace)?
            ),
            String::new(),
        ),
        Group::Namespaces { cmd: NamespacesCmd::SetDeduplication { namespace, enable } } => {
            ("POST", format!("/admin/v2/namespaces/{}/deduplication", namespace_path(namespace)?), enable.to_string())
        }
        Group::Namespaces { cmd: NamespacesCmd::GrantPermission { namespace, role, actions } } => (
            "POST",
            format!("/admin/v2/namespaces/{}/permissions/{role}", namespace_path(namespace)?),
            serde_json::to_string(actions)?,
        ),
        Group::Namespaces { cmd: NamespacesCmd::Permissions { namespace } } => {
            ("GET", format!("/admin/v2/namespaces/{}/permissions", namespace_path(namespace)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::SetMessageTtl { topic, ttl } } => {
            ("POST", format!("/admin/v2/persistent/{}/messageTTL?messageTTL={ttl}", topic_path(topic)?), String::new())
        }
        Group::Schemas { cmd: SchemasCmd::Get { topic, version } } => {
            let at = version.map(|v| format!("/{v}")).unwrap_or_default();
            ("GET", format!("/admin/v2/schemas/{}/schema{at}", topic_path(topic)?), String::new())
        }
        Group::Schemas { cmd: SchemasCmd::Delete { topic } } => {
            ("DELETE", format!("/admin/v2/schemas/{}/schema", topic_path(topic)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::SetDeduplication { topic, enable, .. } } => {
            ("POST", format!("/admin/v2/persistent/{}/deduplicationEnabled", topic_path(topic)?), enable.to_string())
        }
        Group::Topics { cmd: TopicsCmd::GetDeduplication { topic, applied } } => (
            "GET",
            format!("/admin/v2/persistent/{}/deduplicationEnabled?applied={applied}", topic_path(topic)?),
            String::new(),
        ),
        Group::Topics { cmd: TopicsCmd::RemoveDeduplication { topic } } => {
            ("DELETE", format!("/admin/v2/persistent/{}/deduplicationEnabled", topic_path(topic)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::GetMessageTtl { topic, applied } } => {
            ("GET", format!("/admin/v2/persistent/{}/messageTTL?applied={applied}", topic_path(topic)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::RemoveMessageTtl { topic } } => {
            ("DELETE", format!("/admin/v2/persistent/{}/messageTTL", topic_path(topic)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::InternalStats { topic } } => {
            ("GET", format!("/admin/v2/persistent/{}/internalStats", topic_path(topic)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::LastMessageId { topic } } => {
            ("GET", format!("/admin/v2/persistent/{}/lastMessageId", topic_path(topic)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::Unload { topic } } => {
            ("PUT", format!("/admin/v2/persistent/{}/unload", topic_path(topic)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::Terminate { topic } } => {
            ("POST", format!("/admin/v2/persistent/{}/terminate", topic_path(topic)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::Subscriptions { topic } } => {
            ("GET", format!("/admin/v2/persistent/{}/subscriptions", topic_path(topic)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::CreateSubscription { topic, subscription, position } } => {
            let body = match position.as_str() {
                "earliest" => r#"{"ledgerId":-1,"entryId":-1}"#.to_string(),
                "latest" => String::new(),
                other => bail!("--messageId must be earliest or latest, not {other}"),
            };
            ("PUT", format!("/admin/v2/persistent/{}/subscription/{subscription}", topic_path(topic)?), body)
        }
        Group::Topics { cmd: TopicsCmd::Unsubscribe { topic, subscription, force } } => (
            "DELETE",
            format!(
                "/admin/v2/persistent/{}/subscription/{subscription}{}",
                topic_path(topic)?,
                if *force { "?force=true" } else { "" }
            ),
            String::new(),
        ),
        Group::Topics { cmd: TopicsCmd::Skip { topic, subscription, count } } => (
            "POST",
            format!("/admin/v2/persistent/{}/subscription/{subscription}/skip/{count}", topic_path(topic)?),
            String::new(),
        ),
        Group::Topics { cmd: TopicsCmd::SkipAll { topic, subscription } } => (
            "POST",
            format!("/admin/v2/persistent/{}/subscription/{subscription}/skip_all", topic_path(topic)?),
            String::new(),
        ),
        Group::Topics { cmd: TopicsCmd::ExpireMessages { topic, subscription, seconds } } => (
            "POST",
            format!("/admin/v2/persistent/{}/subscription/{subscription}/expireMessages/{seconds}", topic_path(topic)?),
            String::new(),
        ),
        Group::Topics { cmd: TopicsCmd::ResetCursor { topic, subscription, time } } => (
            "POST",
            format!("/admin/v2/persistent/{}/subscription/{subscription}/resetcursor/{time}", topic_path(topic)?),
            String::new(),
        ),
        Group::Topics { cmd: TopicsCmd::PeekMessages { .. } } => unreachable!("handled above"),
        Group::Topics { cmd: TopicsCmd::Stats { topic } } => {
            ("GET", format!("/admin/v2/persistent/{}/stats", topic_path(topic)?), String::new())
        }
        Group::Topics { cmd: TopicsCmd::PartitionedStats { topic } } => {
            ("GET", format!("/admin/v2/persistent/{}/partitioned-stats", topic_path(topic)?), String::new())
        }
    };
    let text = call(u, method, &path, &body).await?;
    if text.is_empty() {
        if !a.json {
            println!("done");
        }
    } else {
        print(a.json, &text);
    }
    Ok(())
}
