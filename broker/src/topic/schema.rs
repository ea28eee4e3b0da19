//! Topic schemas: the schemas producers register, versioned per topic.
//!
//! A topic's schemas live in the metastore under `/schemas/…`, one JSON document listing every
//! version (a partitioned topic's partitions share their parent's, as in Pulsar). A producer
//! that brings a schema gets the version of an identical one (same type and definition), or
//! registers a new version when its type matches the latest version's; a schema of another
//! type is refused with `IncompatibleSchema`. Deleting the schemas (admin) keeps the count, so
//! a version number never names two definitions while messages carrying it may remain. Compatibility of definitions within one type
//! (Pulsar's `schemaCompatibilityStrategy`) is not checked. Producers without a schema (bytes)
//! are not checked, as in Pulsar with `isSchemaValidationEnforced=false`.

use magnetar_metastore::client::{ClientError, MetaClient, PutOptions, Txn};
use serde::{Deserialize, Serialize};

use crate::protocol::names::TopicName;
use crate::protocol::pb;

/// The metastore key of the schemas of `name` (its partitioned parent's for a partition).
pub fn schema_key(name: &TopicName) -> String {
    let n = if name.partition().is_some() { name.partitioned_parent() } else { name.clone() };
    format!("/schemas/{}/{}/{}/{}", n.domain, n.tenant, n.namespace, n.local)
}

/// One registered version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// `Schema.Type` as sent on the wire.
    #[serde(rename = "type")]
    pub kind: i32,
    /// The definition: as is when it is text (JSON and Avro definitions), else hex-encoded
    /// (`hex`; Protobuf-native descriptors, key/value pairs).
    pub data: String,
    #[serde(default)]
    pub hex: bool,
    pub properties: Vec<(String, String)>,
    /// When it was registered (ms since the epoch).
    pub timestamp: u64,
}

/// A topic's versions, the first registered first: a version's number is `first` plus its
/// index.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stored {
    /// The number of `versions[0]`: versions deleted before it are not reused.
    #[serde(default)]
    pub first: u64,
    pub versions: Vec<Version>,
}

/// A schema version as Pulsar sends it: the number as 8 big-endian bytes.
pub fn version_bytes(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

/// The version number of `bytes` (`None` unless 8 bytes).
pub fn version_number(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Pulsar's name of a schema type (`pulsar-admin schemas get`).
pub fn type_name(kind: i32) -> &'static str {
    use pb::schema::Type as T;
    match T::try_from(kind) {
        Ok(T::None) => "NONE",
        Ok(T::String) => "STRING",
        Ok(T::Json) => "JSON",
        Ok(T::Protobuf) => "PROTOBUF",
        Ok(T::Avro) => "AVRO",
        Ok(T::Bool) => "BOOLEAN",
        Ok(T::Int8) => "INT8",
        Ok(T::Int16) => "INT16",
        Ok(T::Int32) => "INT32",
        Ok(T::Int64) => "INT64",
        Ok(T::Float) => "FLOAT",
        Ok(T::Double) => "DOUBLE",
        Ok(T::Date) => "DATE",
        Ok(T::Time) => "TIME",
        Ok(T::Timestamp) => "TIMESTAMP",
        Ok(T::KeyValue) => "KEY_VALUE",
        Ok(T::Instant) => "INSTANT",
        Ok(T::LocalDate) => "LOCAL_DATE",
        Ok(T::LocalTime) => "LOCAL_TIME",
        Ok(T::LocalDateTime) => "LOCAL_DATE_TIME",
        Ok(T::ProtobufNative) => "PROTOBUF_NATIVE",
        Err(_) => "UNKNOWN",
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| s.get(2 * i..2 * i + 2)).filter_map(|h| u8::from_str_radix(h, 16).ok()).collect()
}

impl Version {
    fn of(s: &pb::Schema) -> Version {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let (data, hex) = match std::str::from_utf8(&s.schema_data) {
            Ok(text) => (text.to_owned(), false),
            Err(_) => (hex(&s.schema_data), true),
        };
        Version {
            kind: s.r#type,
            data,
            hex,
            properties: s.properties.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect(),
            timestamp: now.as_millis() as u64,
        }
    }

    /// The definition's bytes.
    pub fn data(&self) -> Vec<u8> {
        match self.hex {
            true => unhex(&self.data),
            false => self.data.as_bytes().to_vec(),
        }
    }

    /// As the wire's `Schema`, named after the topic.
    pub fn to_wire(&self, topic: &str) -> pb::Schema {
        pb::Schema {
            name: topic.to_owned(),
            schema_data: self.data(),
            r#type: self.kind,
            properties: self
                .properties
                .iter()
                .map(|(k, v)| pb::KeyValue { key: k.clone(), value: v.clone() })
                .collect(),
        }
    }
}

/// Why a schema was not registered: the code and message for the client.
pub type Refusal = (pb::ServerError, String);

/// Whether `s` is a schema the broker checks: producers of raw bytes send none, or `None`.
pub fn is_checked(s: &pb::Schema) -> bool {
    s.r#type != pb::schema::Type::None as i32
}

/// Whether a consumer's `s` names a type: not `None`, nor `AUTO_CONSUME` (21), which takes
/// whatever the topic has.
pub fn is_concrete(s: &pb::Schema) -> bool {
    (1..=pb::schema::Type::ProtobufNative as i32).contains(&s.r#type)
}

/// The stored versions of `name`'s topic, with the record's version for a later change.
pub async fn load(meta: &MetaClient, name: &TopicName) -> Result<(Stored, u64), Refusal> {
    let unavailable = |e: ClientError| (pb::ServerError::MetadataError, format!("reading the schemas: {e}"));
    match meta.get(&schema_key(name)).await.map_err(unavailable)? {
        None => Ok((Stored::default(), 0)),
        Some(kv) => match serde_json::from_slice::<Stored>(&kv.value) {
            Ok(s) => Ok((s, kv.version)),
            Err(e) => {
                Err((pb::ServerError::MetadataError, format!("the stored schemas of {name} are unreadable: {e}")))
            }
        },
    }
}

/// The record whose deletion deletes `name`'s topic, with the schemas in the same
/// transaction: a partitioned topic's partition count for a partition of one, else the
/// topic's ledger list. With its version (`None`: the topic does not exist).
async fn anchor(meta: &MetaClient, name: &TopicName) -> Result<(String, Option<u64>), Refusal> {
    let unavailable = |e: ClientError| (pb::ServerError::MetadataError, format!("reading the topic: {e}"));
    if name.partition().is_some() {
        let key = super::partitioned_key(&name.partitioned_parent());
        if let Some(kv) = meta.get(&key).await.map_err(unavailable)? {
            return Ok((key, Some(kv.version)));
        }
    }
    let key = super::topic_key(name);
    let version = meta.get(&key).await.map_err(unavailable)?.map(|kv| kv.version);
    Ok((key, version))
}

/// The version of `schema` for `name`'s topic: an identical version's, or a new one when its
/// type matches the latest version's (or the topic has none). A new version is stored only
/// while the topic exists: the put compares the record whose deletion deletes the topic with
/// its schemas, so a topic deleted meanwhile leaves no schema behind.
pub async fn get_or_create(meta: &MetaClient, name: &TopicName, schema: &pb::Schema) -> Result<u64, Refusal> {
    let new = Version::of(schema);
    let gone = || (pb::ServerError::TopicNotFound, format!("topic {name} does not exist"));
    // Two producers registering at once: the loser of the compare-and-set reads again.
    for _ in 0..8 {
        let (mut stored, at) = load(meta, name).await?;
        if let Some(i) = stored.versions.iter().position(|v| v.kind == new.kind && v.data == new.data) {
            return Ok(stored.first + i as u64);
        }
        if let Some(latest) = stored.versions.last() {
            if latest.kind != new.kind {
                return Err((
                    pb::ServerError::IncompatibleSchema,
                    format!(
                        "{name} has a {} schema; a {} schema is incompatible with it",
                        type_name(latest.kind),
                        type_name(new.kind)
                    ),
                ));
            }
        }
        let (anchor, Some(anchor_version)) = anchor(meta, name).await? else { return Err(gone()) };
        stored.versions.push(new.clone());
        let body = serde_json::to_vec(&stored).unwrap_or_default();
        let key = schema_key(name);
        let txn = Txn::default().compare(&key, at).compare(&anchor, anchor_version).put(&key, body, 0);
        match meta.txn(txn).await {
            Ok(r) if r.succeeded => return Ok(stored.first + stored.versions.len() as u64 - 1),
            Ok(r) if r.failed_compare == 1 && r.actual_version == 0 => return Err(gone()),
            // The schemas or the topic's record changed meanwhile (a rollover): read again.
            Ok(_) => continue,
            Err(e) => return Err((pb::ServerError::MetadataError, format!("storing the schema: {e}"))),
        }
    }
    Err((pb::ServerError::ServiceNotReady, format!("the schemas of {name} kept changing; retry")))
}

/// Whether a consumer with `schema` may read `name`'s topic: its type must be the latest
/// version's when the topic has schemas.
pub async fn check_consumer(meta: &MetaClient, name: &TopicName, schema: &pb::Schema) -> Result<(), Refusal> {
    let (stored, _) = load(meta, name).await?;
    match stored.versions.last() {
        Some(latest) if latest.kind != schema.r#type => Err((
            pb::ServerError::IncompatibleSchema,
            format!(
                "{name} has a {} schema; a consumer with a {} schema cannot read it",
                type_name(latest.kind),
                type_name(schema.r#type)
            ),
        )),
        _ => Ok(()),
    }
}

/// Version `version` of `name`'s schemas (the latest without one), with its number.
pub async fn get(meta: &MetaClient, name: &TopicName, version: Option<u64>) -> Result<Option<(u64, Version)>, Refusal> {
    let (stored, _) = load(meta, name).await?;
    let n = match version {
        Some(v) => v,
        None => match stored.versions.len() {
            0 => return Ok(None),
            len => stored.first + len as u64 - 1,
        },
    };
    let at = n.checked_sub(stored.first).and_then(|i| stored.versions.get(i as usize));
    Ok(at.map(|v| (n, v.clone())))
}

/// Deletes every version of `name`'s schemas, keeping their count (see the module docs);
/// answers the last one deleted.
pub async fn delete_all(meta: &MetaClient, name: &TopicName) -> Result<Option<u64>, Refusal> {
    for _ in 0..8 {
        let (mut stored, at) = load(meta, name).await?;
        if stored.versions.is_empty() {
            return Ok(None);
        }
        stored.first += stored.versions.len() as u64;
        stored.versions.clear();
        let body = serde_json::to_vec(&stored).unwrap_or_default();
        match meta.put(&schema_key(name), body, PutOptions { expected_version: Some(at), session: 0 }).await {
            Ok(_) => return Ok(Some(stored.first - 1)),
            Err(ClientError::BadVersion { .. }) => continue,
            Err(e) => return Err((pb::ServerError::MetadataError, format!("deleting the schemas: {e}"))),
        }
    }
    Err((pb::ServerError::ServiceNotReady, format!("the schemas of {name} kept changing; retry")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_definitions_round_trip() {
        assert_eq!(version_bytes(3), vec![0, 0, 0, 0, 0, 0, 0, 3]);
        assert_eq!(version_number(&version_bytes(258)), Some(258));
        assert_eq!(version_number(&[1, 2]), None);
        let s = pb::Schema {
            name: "t".into(),
            schema_data: vec![0, 0x7b, 0xff],
            r#type: pb::schema::Type::Json as i32,
            properties: vec![pb::KeyValue { key: "k".into(), value: "v".into() }],
        };
        let v = Version::of(&s);
        assert_eq!((v.data.as_str(), v.hex), ("007bff", true));
        assert_eq!(v.to_wire("t"), s);
        assert_eq!(type_name(v.kind), "JSON");
        let text = pb::Schema { schema_data: br#"{"type":"record"}"#.to_vec(), ..s };
        let v = Version::of(&text);
        assert_eq!((v.data.as_str(), v.hex), (r#"{"type":"record"}"#, false));
        assert_eq!(v.to_wire("t"), text);
    }

    #[test]
    fn partitions_share_their_parents_schemas() {
        let p = TopicName::parse("persistent://a/b/c-partition-2").unwrap();
        let whole = TopicName::parse("persistent://a/b/c").unwrap();
        assert_eq!(schema_key(&p), schema_key(&whole));
        assert_eq!(schema_key(&whole), "/schemas/persistent/a/b/c");
    }
}
