//! Backlog quotas: Pulsar's `destination_storage` quota, a limit on the bytes a topic's
//! subscriptions may leave unacknowledged, and what a topic does past it.

use serde_json::Value;

/// What a topic does once a subscription's backlog passes the limit (Pulsar's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaPolicy {
    /// Producers are closed and new ones refused with `ProducerBlockedQuotaExceededError`,
    /// which clients retry until the backlog shrinks or their timeout.
    ProducerRequestHold,
    /// Producers are closed and new ones refused with
    /// `ProducerBlockedQuotaExceededException`, which clients report at once.
    ProducerException,
    /// The oldest messages of every subscription over the limit are acknowledged (evicted)
    /// until it is within the limit.
    ConsumerBacklogEviction,
}

impl QuotaPolicy {
    /// The policy named as Pulsar names it (`producer_request_hold`, …).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "producer_request_hold" => Some(QuotaPolicy::ProducerRequestHold),
            "producer_exception" => Some(QuotaPolicy::ProducerException),
            "consumer_backlog_eviction" => Some(QuotaPolicy::ConsumerBacklogEviction),
            _ => None,
        }
    }

    /// Whether producers are held off (rather than messages evicted).
    pub fn blocks_producers(self) -> bool {
        self != QuotaPolicy::ConsumerBacklogEviction
    }
}

/// A size quota on a topic's backlog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BacklogQuota {
    /// Bytes a subscription may leave unacknowledged.
    pub limit_bytes: u64,
    /// What happens past them.
    pub policy: QuotaPolicy,
}

impl BacklogQuota {
    /// A quota of `limit` bytes (negative: none), as the broker's default is given.
    pub fn from_limit(limit: i64, policy: QuotaPolicy) -> Option<Self> {
        u64::try_from(limit).ok().map(|limit_bytes| BacklogQuota { limit_bytes, policy })
    }

    /// A quota as Pulsar's admin API sends it: `{"limitSize": bytes, "policy": "…"}` (the
    /// older `limit` for the size is read too). `Err` says what is wrong.
    pub fn from_json(v: &Value) -> Result<Option<Self>, String> {
        let present = |k: &str| v.get(k).filter(|x| !x.is_null());
        let size = present("limitSize").or_else(|| present("limit"));
        let Some(limit) = size.and_then(Value::as_i64) else {
            return Err("the quota needs a whole-number limitSize (bytes; -1: no limit)".into());
        };
        let name = v.get("policy").and_then(Value::as_str).unwrap_or("producer_request_hold");
        let Some(policy) = QuotaPolicy::parse(name) else {
            return Err(format!(
                "unknown backlog quota policy {name}: producer_request_hold, producer_exception or consumer_backlog_eviction"
            ));
        };
        Ok(BacklogQuota::from_limit(limit, policy))
    }

    /// The `destination_storage` quota a namespace's stored policies set: `Ok(None)` when
    /// they set none (the broker's default applies), `Ok(Some(None))` when they set no limit.
    pub fn from_policies(policies: &Value) -> Result<Option<Option<Self>>, String> {
        match policies.get("backlog_quota_map").and_then(|m| m.get("destination_storage")) {
            Some(quota) => BacklogQuota::from_json(quota).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quotas_read_as_pulsar_writes_them() {
        let q = |v: Value| BacklogQuota::from_json(&v);
        assert_eq!(
            q(json!({"limitSize": 1024, "limitTime": -1, "policy": "producer_exception"})),
            Ok(Some(BacklogQuota { limit_bytes: 1024, policy: QuotaPolicy::ProducerException }))
        );
        assert_eq!(
            q(json!({"limit": 10, "policy": "consumer_backlog_eviction"})),
            Ok(Some(BacklogQuota { limit_bytes: 10, policy: QuotaPolicy::ConsumerBacklogEviction }))
        );
        assert_eq!(
            q(json!({"limitSize": 5})),
            Ok(Some(BacklogQuota { limit_bytes: 5, policy: QuotaPolicy::ProducerRequestHold }))
        );
        assert_eq!(q(json!({"limitSize": -1, "policy": "producer_exception"})), Ok(None), "-1: no limit");
        assert_eq!(
            q(json!({"limitSize": null, "limit": 3})),
            Ok(Some(BacklogQuota { limit_bytes: 3, policy: QuotaPolicy::ProducerRequestHold }))
        );
        assert!(q(json!({"limitSize": 5, "policy": "drop_everything"})).is_err());
        assert!(q(json!({"policy": "producer_exception"})).is_err());
        assert!(q(json!({"limitSize": "big"})).is_err());
    }

    #[test]
    fn a_namespace_without_a_storage_quota_leaves_the_default() {
        let stored =
            json!({"backlog_quota_map": {"destination_storage": {"limitSize": 7, "policy": "producer_exception"}}});
        let quota = BacklogQuota { limit_bytes: 7, policy: QuotaPolicy::ProducerException };
        assert_eq!(BacklogQuota::from_policies(&stored), Ok(Some(Some(quota))));
        let unlimited = json!({"backlog_quota_map": {"destination_storage": {"limitSize": -1}}});
        assert_eq!(BacklogQuota::from_policies(&unlimited), Ok(Some(None)));
        let age_only = json!({"backlog_quota_map": {"message_age": {"limitTime": 5}}});
        assert_eq!(BacklogQuota::from_policies(&age_only), Ok(None));
        assert_eq!(BacklogQuota::from_policies(&json!({})), Ok(None));
        let broken = json!({"backlog_quota_map": {"destination_storage": {"policy": "producer_exception"}}});
        assert!(BacklogQuota::from_policies(&broken).is_err());
        assert!(QuotaPolicy::ProducerRequestHold.blocks_producers());
        assert!(!QuotaPolicy::ConsumerBacklogEviction.blocks_producers());
    }
}
