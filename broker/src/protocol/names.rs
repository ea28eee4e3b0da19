//! Topic names: `persistent://tenant/namespace/topic`, the short forms clients send, and
//! partitions (`<topic>-partition-<n>`).

use std::fmt;

/// Suffix of a partition's name.
pub const PARTITION_SUFFIX: &str = "-partition-";

/// A fully qualified topic name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName {
    /// `persistent` or `non-persistent`.
    pub domain: String,
    /// Tenant.
    pub tenant: String,
    /// Namespace (without the tenant).
    pub namespace: String,
    /// Local name (may carry a partition suffix).
    pub local: String,
}

/// Why a name is not a topic name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid topic name `{name}`: {reason}")]
pub struct InvalidTopicName {
    /// The name.
    pub name: String,
    /// Why.
    pub reason: &'static str,
}

fn valid_part(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.=:%".contains(c))
}

impl TopicName {
    /// Parses a full or short name: `my-topic` → `persistent://public/default/my-topic`,
    /// `tenant/ns/topic` → `persistent://tenant/ns/topic`.
    pub fn parse(name: &str) -> Result<Self, InvalidTopicName> {
        let bad = |reason| InvalidTopicName { name: name.to_owned(), reason };
        let (domain, rest) = match name.split_once("://") {
            Some((d, r)) => (d, r),
            None => ("persistent", name),
        };
        if domain != "persistent" && domain != "non-persistent" {
            return Err(bad("the domain must be persistent or non-persistent"));
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let (tenant, namespace, local) = match parts.as_slice() {
            [local] if !name.contains("://") => ("public", "default", *local),
            [t, n, l] => (*t, *n, *l),
            _ => return Err(bad("expected tenant/namespace/topic")),
        };
        if !valid_part(tenant) || !valid_part(namespace) || !valid_part(local) {
            return Err(bad("names use letters, digits and -_.=:% and are not empty"));
        }
        Ok(TopicName { domain: domain.into(), tenant: tenant.into(), namespace: namespace.into(), local: local.into() })
    }

    /// The partition index, when this names a partition.
    pub fn partition(&self) -> Option<u32> {
        let (_, n) = self.local.rsplit_once(PARTITION_SUFFIX)?;
        n.parse().ok()
    }

    /// The partitioned topic this partition belongs to (itself when not a partition).
    pub fn partitioned_parent(&self) -> TopicName {
        match self.local.rsplit_once(PARTITION_SUFFIX) {
            Some((base, n)) if n.parse::<u32>().is_ok() => TopicName { local: base.to_owned(), ..self.clone() },
            _ => self.clone(),
        }
    }

    /// Partition `i` of this topic.
    pub fn partition_name(&self, i: u32) -> TopicName {
        TopicName { local: format!("{}{PARTITION_SUFFIX}{i}", self.local), ..self.clone() }
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}/{}/{}", self.domain, self.tenant, self.namespace, self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_full_forms() {
        let t = TopicName::parse("my-topic").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.to_string(), "persistent://public/default/my-topic");
        let t = TopicName::parse("acme/orders/o-1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.to_string(), "persistent://acme/orders/o-1");
        let t = TopicName::parse("non-persistent://a/b/c").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.domain, "non-persistent");
        for bad in ["", "a/b", "x://a/b/c", "persistent://a/b", "persistent://a//c", "a/b/c/d", "persistent://a/b/c d"]
        {
            assert!(TopicName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn partitions() {
        let t = TopicName::parse("persistent://a/b/t").unwrap_or_else(|e| panic!("{e}"));
        let p = t.partition_name(3);
        assert_eq!(p.to_string(), "persistent://a/b/t-partition-3");
        assert_eq!(p.partition(), Some(3));
        assert_eq!(p.partitioned_parent(), t);
        assert_eq!(t.partition(), None);
        assert_eq!(TopicName::parse("a/b/t-partition-x").map(|t| t.partition()), Ok(None));
    }
}
