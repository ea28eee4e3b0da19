//! Layered configuration shared by every Magnetar binary.
//!
//! A config struct `T` is assembled from four layers, later layers winning:
//!
//! 1. `T::default()` — so every key has a documented fallback and the set of
//!    valid keys is known up front;
//! 2. an optional TOML file, deep-merged table by table;
//! 3. the environment: `MAGNETAR_RAFT__HEARTBEAT_MS=200` sets
//!    `raft.heartbeat_ms` (`__` separates nesting levels), plus explicit
//!    aliases for names Pulsar users already know (`brokerServicePort`);
//! 4. `--set key=value` style overrides from the command line.
//!
//! The merged table is then deserialized into `T` and validated. Every error
//! names the offending key and, where it came from a layer, which one, because
//! "invalid type: string, expected u64" alone is useless in a 200-line file.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use toml::{Table, Value};

/// Environment variables that share the prefix but are read by other parts of
/// the program (telemetry), so they must not trip the unknown-key check.
const ALWAYS_IGNORED_ENV: &[&str] = &["MAGNETAR_LOG", "MAGNETAR_LOG_FORMAT"];

/// Post-deserialization checks a config struct performs on itself.
///
/// Implementations should return [`ConfigError::Invalid`] with the dotted key
/// of the offending field so the message points the operator at the fix.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Everything that can go wrong while loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error(
        "environment variable `{var}` does not match any configuration key \
         (check the spelling, or unset it)"
    )]
    UnknownEnv { var: String },
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("invalid configuration: {message}")]
    Deserialize { message: String },
}

/// Builder that assembles a config struct from defaults, file, environment
/// and overrides. See the module docs for precedence.
#[derive(Debug, Clone)]
pub struct ConfigLoader<'a> {
    env_prefix: &'a str,
    file: Option<&'a Path>,
    aliases: Vec<(&'a str, &'a str)>,
    ignored_env: Vec<&'a str>,
    overrides: Vec<(String, String)>,
}

impl<'a> ConfigLoader<'a> {
    /// `env_prefix` selects which environment variables are config, e.g.
    /// `"MAGNETAR_"`. An empty prefix disables the prefixed mapping (aliases
    /// still apply), because treating the whole environment as config would
    /// make every `PATH` an unknown key.
    pub fn new(env_prefix: &'a str) -> Self {
        Self { env_prefix, file: None, aliases: Vec::new(), ignored_env: Vec::new(), overrides: Vec::new() }
    }

    /// TOML file to merge over the defaults. `None` means "no file", which
    /// lets callers pass a CLI `Option<PathBuf>` straight through.
    pub fn file(mut self, path: Option<&'a Path>) -> Self {
        self.file = path;
        self
    }

    /// Maps an extra environment variable (used verbatim, no prefix needed)
    /// onto a dotted key. A prefixed variable for the same key wins over the
    /// alias, since it is the more specific spelling.
    pub fn env_alias(mut self, env_name: &'a str, key: &'a str) -> Self {
        self.aliases.push((env_name, key));
        self
    }

    /// Exempts a prefixed environment variable from the unknown-key check;
    /// for variables consumed by something other than the config struct.
    pub fn ignore_env(mut self, name: &'a str) -> Self {
        self.ignored_env.push(name);
        self
    }

    /// Command-line override of a dotted key. The value is parsed as a TOML
    /// value (integer, float, bool, array, ...) and falls back to a plain
    /// string; if the key's current value is a string it stays a string, so
    /// `cluster.name=007` does not turn into the integer 7.
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.overrides.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Loads `T` using the process environment.
    pub fn load<T>(self) -> Result<T, ConfigError>
    where
        T: Serialize + DeserializeOwned + Default + Validate,
    {
        let env: Vec<(String, String)> = std::env::vars().collect();
        self.load_with_env(&env)
    }

    /// Loads `T` with an explicit environment, so tests need not mutate the
    /// (process-global, racy) real one.
    pub fn load_with_env<T>(self, env: &[(String, String)]) -> Result<T, ConfigError>
    where
        T: Serialize + DeserializeOwned + Default + Validate,
    {
        let mut origins = Origins::default();

        let mut merged = match Value::try_from(T::default()) {
            Ok(Value::Table(t)) => t,
            Ok(other) => {
                return Err(ConfigError::Deserialize {
                    message: format!("config defaults must serialize to a table, got {}", other.type_str()),
                })
            }
            Err(e) => {
                return Err(ConfigError::Deserialize { message: format!("cannot serialize config defaults: {e}") })
            }
        };

        if let Some(path) = self.file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
            let file_table: Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string().trim_end().to_owned(),
            })?;
            origins.record_table("", &file_table, &format!("file {}", path.display()));
            deep_merge(&mut merged, file_table);
        }

        self.apply_env(&mut merged, &mut origins, env)?;

        for (key, raw) in &self.overrides {
            let segments = split_key(key).ok_or_else(|| ConfigError::Invalid {
                key: key.clone(),
                reason: "override key must be dotted identifiers like `raft.heartbeat_ms`".to_owned(),
            })?;
            let value = parse_value(raw, lookup(&merged, &segments));
            insert(&mut merged, &segments, value)
                .map_err(|reason| ConfigError::Invalid { key: key.clone(), reason })?;
            origins.record(key, format!("override `{key}={raw}`"));
        }

        let config = T::deserialize(PathDeserializer::root(Value::Table(merged))).map_err(|e| {
            let mut message = if e.path.is_empty() { e.message } else { format!("{}: {}", e.path, e.message) };
            if let Some(origin) = origins.find(&e.path) {
                message.push_str(&format!(" (from {origin})"));
            }
            ConfigError::Deserialize { message }
        })?;

        config.validate()?;
        Ok(config)
    }

    fn apply_env(
        &self,
        merged: &mut Table,
        origins: &mut Origins,
        env: &[(String, String)],
    ) -> Result<(), ConfigError> {
        // Aliases first so that the canonical prefixed spelling overrides them.
        for (alias, key) in &self.aliases {
            let Some((_, raw)) = env.iter().find(|(name, _)| name == alias) else {
                continue;
            };
            let segments = split_key(key).ok_or_else(|| ConfigError::Invalid {
                key: (*key).to_owned(),
                reason: format!("env alias `{alias}` maps to a malformed key"),
            })?;
            let value = parse_value(raw, lookup(merged, &segments));
            insert(merged, &segments, value)
                .map_err(|reason| ConfigError::Invalid { key: (*key).to_owned(), reason })?;
            origins.record(key, format!("environment variable {alias}"));
        }

        if self.env_prefix.is_empty() {
            return Ok(());
        }

        let skip: HashSet<&str> = ALWAYS_IGNORED_ENV
            .iter()
            .copied()
            .chain(self.ignored_env.iter().copied())
            .chain(self.aliases.iter().map(|(alias, _)| *alias))
            .collect();

        // Sorted so that the first unknown variable reported is deterministic.
        let mut prefixed: Vec<&(String, String)> =
            env.iter().filter(|(name, _)| name.starts_with(self.env_prefix) && !skip.contains(name.as_str())).collect();
        prefixed.sort();

        for (name, raw) in prefixed {
            let unknown = || ConfigError::UnknownEnv { var: name.clone() };
            let lowered = name[self.env_prefix.len()..].to_lowercase();
            let segments: Vec<&str> = lowered.split("__").collect();
            if segments.iter().any(|s| s.is_empty()) {
                return Err(unknown());
            }
            // The key must already exist (from defaults or the file): this is
            // what turns a typo such as MAGNETAR_RAFT__HEARTBEAT=1 into an
            // error instead of a silently ignored setting.
            let current = lookup(merged, &segments).ok_or_else(unknown)?;
            let value = parse_value(raw, Some(current));
            insert(merged, &segments, value).map_err(|_| unknown())?;
            origins.record(&segments.join("."), format!("environment variable {name}"));
        }
        Ok(())
    }
}

/// Parses `host:port` for the config key `key`. Accepts IP literals and
/// `localhost` (resolved to 127.0.0.1); other host names are rejected rather
/// than resolved, so loading config never blocks on DNS.
pub fn parse_socket_addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid { key: key.to_owned(), reason };
    if let Ok(addr) = v.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some(port) = v.strip_prefix("localhost:") {
        let port: u16 = port.parse().map_err(|e| invalid(format!("`{v}` has an invalid port: {e}")))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    Err(invalid(format!("`{v}` is not a socket address; expected `ip:port` such as `0.0.0.0:6650` or `[::1]:6650`")))
}

/// Splits a dotted key, rejecting empty segments (`a..b`, `.a`, ``).
fn split_key(key: &str) -> Option<Vec<&str>> {
    let segments: Vec<&str> = key.split('.').collect();
    if segments.iter().any(|s| s.trim().is_empty()) {
        None
    } else {
        Some(segments)
    }
}

fn lookup<'t, S: AsRef<str>>(table: &'t Table, segments: &[S]) -> Option<&'t Value> {
    let (last, parents) = segments.split_last()?;
    let mut current = table;
    for segment in parents {
        match current.get(segment.as_ref()) {
            Some(Value::Table(t)) => current = t,
            _ => return None,
        }
    }
    current.get(last.as_ref())
}

/// Sets a dotted key, creating intermediate tables that do not exist yet.
fn insert<S: AsRef<str>>(table: &mut Table, segments: &[S], value: Value) -> Result<(), String> {
    let Some((last, parents)) = segments.split_last() else {
        return Err("empty key".to_owned());
    };
    let mut current = table;
    let mut walked = Vec::new();
    for segment in parents {
        let segment = segment.as_ref();
        walked.push(segment);
        let entry = current.entry(segment.to_owned()).or_insert_with(|| Value::Table(Table::new()));
        match entry {
            Value::Table(t) => current = t,
            other => return Err(format!("`{}` is a {}, not a table", walked.join("."), other.type_str())),
        }
    }
    current.insert(last.as_ref().to_owned(), value);
    Ok(())
}

fn deep_merge(base: &mut Table, overlay: Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(base_sub)), Value::Table(overlay_sub)) => deep_merge(base_sub, overlay_sub),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Interprets a raw string from the environment or command line.
///
/// TOML syntax gives users ints, floats, bools and arrays for free; anything
/// that does not parse as exactly one TOML value is taken literally. When the
/// existing value is a string the raw text is kept verbatim, otherwise ids
/// like `007` or names like `true` would change type.
fn parse_value(raw: &str, current: Option<&Value>) -> Value {
    if matches!(current, Some(Value::String(_))) {
        return Value::String(raw.to_owned());
    }
    match toml::from_str::<Table>(&format!("v = {raw}")) {
        // A single-entry check stops `1\nother = 2` from smuggling in keys.
        Ok(mut t) if t.len() == 1 => t.remove("v").unwrap_or_else(|| Value::String(raw.to_owned())),
        _ => Value::String(raw.to_owned()),
    }
}

/// Which layer last set each dotted key, for error messages.
#[derive(Default)]
struct Origins(BTreeMap<String, String>);

impl Origins {
    fn record(&mut self, key: &str, origin: String) {
        self.0.insert(key.to_owned(), origin);
    }

    fn record_table(&mut self, prefix: &str, table: &Table, origin: &str) {
        for (key, value) in table {
            let path = join_path(prefix, key);
            if let Value::Table(sub) = value {
                self.record_table(&path, sub, origin);
            }
            self.record(&path, origin.to_owned());
        }
    }

    /// The origin of `path` or of its nearest recorded ancestor (an error
    /// inside `a.b[2].c` is blamed on whoever set `a.b`).
    fn find(&self, path: &str) -> Option<&str> {
        let mut candidate = path;
        loop {
            if candidate.is_empty() {
                return None;
            }
            if let Some(origin) = self.0.get(candidate) {
                return Some(origin);
            }
            candidate = match candidate.rfind(['.', '[']) {
                Some(idx) => &candidate[..idx],
                None => "",
            };
        }
    }
}

fn join_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// Error produced while deserializing the merged table, tagged with the
/// dotted path of the value being deserialized when it was raised.
#[derive(Debug)]
struct PathError {
    path: String,
    message: String,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for PathError {}

impl serde::de::Error for PathError {
    fn custom<M: fmt::Display>(msg: M) -> Self {
        PathError { path: String::new(), message: msg.to_string() }
    }
}

/// Tags an error with `path` unless a deeper deserializer already did; the
/// innermost path is the precise one.
fn at<R>(path: &str, result: Result<R, PathError>) -> Result<R, PathError> {
    result.map_err(|mut e| {
        if e.path.is_empty() {
            e.path = path.to_owned();
        }
        e
    })
}

/// A `Deserializer` over a `toml::Value` that remembers where it is.
///
/// `toml::Value`'s own deserializer does not report key paths, and the
/// string deserializer that does is unavailable (no `display` feature to
/// re-serialize the merged table). Owning the traversal is the simplest way
/// to make every error name its key.
struct PathDeserializer {
    value: Value,
    path: String,
}

impl PathDeserializer {
    fn root(value: Value) -> Self {
        Self { value, path: String::new() }
    }
}

impl<'de> serde::Deserializer<'de> for PathDeserializer {
    type Error = PathError;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, PathError> {
        let path = self.path;
        let result = match self.value {
            Value::Boolean(b) => visitor.visit_bool(b),
            Value::Integer(i) => visitor.visit_i64(i),
            Value::Float(f) => visitor.visit_f64(f),
            Value::String(s) => visitor.visit_string(s),
            Value::Datetime(d) => visitor.visit_string(d.to_string()),
            Value::Array(items) => {
                let len = items.len();
                let mut seq = SeqAccess { items: items.into_iter().enumerate(), path: path.clone() };
                visitor.visit_seq(&mut seq).and_then(|v| {
                    if seq.items.len() == 0 {
                        Ok(v)
                    } else {
                        Err(serde::de::Error::invalid_length(len, &"fewer elements in array"))
                    }
                })
            }
            Value::Table(table) => {
                let len = table.len();
                let entries: Vec<(String, Value)> = table.into_iter().collect();
                let mut map = MapAccess { entries: entries.into_iter(), pending: None, path: path.clone() };
                visitor.visit_map(&mut map).and_then(|v| {
                    if map.entries.len() == 0 {
                        Ok(v)
                    } else {
                        Err(serde::de::Error::invalid_length(len, &"fewer elements in table"))
                    }
                })
            }
        };
        at(&path, result)
    }

    // A present key is always `Some`; absence is handled by serde defaults.
    fn deserialize_option<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, PathError> {
        let path = self.path.clone();
        at(&path, visitor.visit_some(self))
    }

    fn deserialize_newtype_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, PathError> {
        let path = self.path.clone();
        at(&path, visitor.visit_newtype_struct(self))
    }

    // Unit variants are written as strings (`mode = "leader"`), data-carrying
    // ones as a single-key table (`mode = { fixed = 3 }`).
    fn deserialize_enum<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, PathError> {
        let path = self.path;
        let result = match self.value {
            Value::String(s) => visitor.visit_enum(serde::de::value::StringDeserializer::<PathError>::new(s)),
            Value::Table(table) if table.len() == 1 => match table.into_iter().next() {
                Some((variant, value)) => visitor.visit_enum(EnumAccess { variant, value, path: path.clone() }),
                None => Err(serde::de::Error::custom("expected one enum variant")),
            },
            other => Err(serde::de::Error::custom(format!(
                "invalid type: {}, expected a variant name or a table with exactly one key",
                other.type_str()
            ))),
        };
        at(&path, result)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
}

struct SeqAccess {
    items: std::iter::Enumerate<std::vec::IntoIter<Value>>,
    path: String,
}

impl<'de> serde::de::SeqAccess<'de> for SeqAccess {
    type Error = PathError;

    fn next_element_seed<S: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, PathError> {
        match self.items.next() {
            Some((idx, value)) => {
                seed.deserialize(PathDeserializer { value, path: format!("{}[{idx}]", self.path) }).map(Some)
            }
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAccess {
    entries: std::vec::IntoIter<(String, Value)>,
    pending: Option<(String, Value)>,
    path: String,
}

impl<'de> serde::de::MapAccess<'de> for MapAccess {
    type Error = PathError;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, PathError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        let path = join_path(&self.path, &key);
        self.pending = Some((path.clone(), value));
        // The key carries its own full path so that `deny_unknown_fields`
        // errors name `raft.bogus`, not just `raft`.
        seed.deserialize(PathDeserializer { value: Value::String(key), path }).map(Some)
    }

    fn next_value_seed<S: serde::de::DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, PathError> {
        match self.pending.take() {
            Some((path, value)) => seed.deserialize(PathDeserializer { value, path }),
            None => Err(serde::de::Error::custom("value requested before key")),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

struct EnumAccess {
    variant: String,
    value: Value,
    path: String,
}

impl<'de> serde::de::EnumAccess<'de> for EnumAccess {
    type Error = PathError;
    type Variant = PathDeserializer;

    fn variant_seed<S: serde::de::DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, PathDeserializer), PathError> {
        let path = join_path(&self.path, &self.variant);
        let variant =
            at(&path, seed.deserialize(serde::de::value::StringDeserializer::<PathError>::new(self.variant)))?;
        Ok((variant, PathDeserializer { value: self.value, path }))
    }
}

impl<'de> serde::de::VariantAccess<'de> for PathDeserializer {
    type Error = PathError;

    fn unit_variant(self) -> Result<(), PathError> {
        serde::de::Deserialize::deserialize(self)
    }

    fn newtype_variant_seed<S: serde::de::DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, PathError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: serde::de::Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, PathError> {
        serde::Deserializer::deserialize_any(self, visitor)
    }

    fn struct_variant<V: serde::de::Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, PathError> {
        serde::Deserializer::deserialize_any(self, visitor)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is the failure report in tests
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::io::Write;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct TestConfig {
        cluster_name: String,
        node_id: String,
        data_dir: PathBuf,
        tags: Vec<String>,
        advertised: Option<String>,
        mode: Mode,
        raft: RaftSection,
        broker: BrokerSection,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Standalone,
        Cluster,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct RaftSection {
        heartbeat_ms: u64,
        election_ratio: f64,
        enabled: bool,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct BrokerSection {
        port: u16,
        listen: String,
    }

    impl Default for TestConfig {
        fn default() -> Self {
            Self {
                cluster_name: "standalone".into(),
                node_id: "1".into(),
                data_dir: PathBuf::from("data"),
                tags: vec!["a".into()],
                advertised: None,
                mode: Mode::Standalone,
                raft: RaftSection::default(),
                broker: BrokerSection::default(),
            }
        }
    }

    impl Default for RaftSection {
        fn default() -> Self {
            Self { heartbeat_ms: 100, election_ratio: 10.0, enabled: true }
        }
    }

    impl Default for BrokerSection {
        fn default() -> Self {
            Self { port: 6650, listen: "0.0.0.0:6650".into() }
        }
    }

    impl Validate for TestConfig {
        fn validate(&self) -> Result<(), ConfigError> {
            if self.raft.heartbeat_ms == 0 {
                return Err(ConfigError::Invalid { key: "raft.heartbeat_ms".into(), reason: "must be > 0".into() });
            }
            parse_socket_addr("broker.listen", &self.broker.listen)?;
            Ok(())
        }
    }

    fn write_file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f.flush().unwrap();
        f
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn load(loader: ConfigLoader<'_>, pairs: &[(&str, &str)]) -> Result<TestConfig, ConfigError> {
        loader.load_with_env(&env(pairs))
    }

    #[test]
    fn defaults_only() {
        let cfg = load(ConfigLoader::new("MAGNETAR_"), &[("PATH", "/bin")]).unwrap();
        assert_eq!(cfg, TestConfig::default());
    }

    #[test]
    fn file_overrides_nested_key_and_keeps_siblings() {
        let f = write_file("cluster_name = \"prod\"\n[raft]\nheartbeat_ms = 250\n");
        let cfg = load(ConfigLoader::new("MAGNETAR_").file(Some(f.path())), &[]).unwrap();
        assert_eq!(cfg.cluster_name, "prod");
        assert_eq!(cfg.raft.heartbeat_ms, 250);
        // Deep merge: the rest of [raft] keeps its defaults.
        assert!(cfg.raft.enabled);
        assert_eq!(cfg.raft.election_ratio, 10.0);
        assert_eq!(cfg.broker, BrokerSection::default());
    }

    #[test]
    fn file_none_is_defaults() {
        let cfg = load(ConfigLoader::new("MAGNETAR_").file(None), &[]).unwrap();
        assert_eq!(cfg, TestConfig::default());
    }

    #[test]
    fn env_overrides_file() {
        let f = write_file("[raft]\nheartbeat_ms = 250\nenabled = true\n");
        let cfg = load(
            ConfigLoader::new("MAGNETAR_").file(Some(f.path())),
            &[
                ("MAGNETAR_RAFT__HEARTBEAT_MS", "300"),
                ("MAGNETAR_RAFT__ENABLED", "false"),
                ("MAGNETAR_TAGS", "[\"x\", \"y\"]"),
                ("MAGNETAR_MODE", "cluster"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.raft.heartbeat_ms, 300);
        assert!(!cfg.raft.enabled);
        assert_eq!(cfg.tags, vec!["x".to_string(), "y".to_string()]);
        assert_eq!(cfg.mode, Mode::Cluster);
    }

    #[test]
    fn set_overrides_env() {
        let cfg = load(
            ConfigLoader::new("MAGNETAR_")
                .set("raft.heartbeat_ms", "400")
                .set("raft.election_ratio", "2.5")
                .set("cluster_name", "007"),
            &[("MAGNETAR_RAFT__HEARTBEAT_MS", "300")],
        )
        .unwrap();
        assert_eq!(cfg.raft.heartbeat_ms, 400);
        assert_eq!(cfg.raft.election_ratio, 2.5);
        assert_eq!(cfg.cluster_name, "007");
    }

    #[test]
    fn unknown_file_key_names_key_and_file() {
        let f = write_file("[raft]\nheartbeat_msec = 5\n");
        let err = load(ConfigLoader::new("MAGNETAR_").file(Some(f.path())), &[]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Deserialize { .. }), "{err:?}");
        assert!(msg.contains("raft.heartbeat_msec"), "{msg}");
        assert!(msg.contains("unknown field"), "{msg}");
        assert!(msg.contains(&f.path().display().to_string()), "{msg}");
    }

    #[test]
    fn unknown_top_level_file_key() {
        let f = write_file("clustr_name = \"x\"\n");
        let msg = load(ConfigLoader::new("MAGNETAR_").file(Some(f.path())), &[]).unwrap_err().to_string();
        assert!(msg.contains("clustr_name"), "{msg}");
    }

    #[test]
    fn unknown_env_var_is_error_naming_variable() {
        let err =
            load(ConfigLoader::new("MAGNETAR_"), &[("MAGNETAR_RAFT__HEARTBEAT", "5"), ("HOME", "/root")]).unwrap_err();
        match &err {
            ConfigError::UnknownEnv { var } => assert_eq!(var, "MAGNETAR_RAFT__HEARTBEAT"),
            other => panic!("expected UnknownEnv, got {other:?}"),
        }
        assert!(err.to_string().contains("MAGNETAR_RAFT__HEARTBEAT"));
    }

    #[test]
    fn env_below_a_leaf_or_with_empty_segment_is_unknown() {
        for var in ["MAGNETAR_RAFT__HEARTBEAT_MS__X", "MAGNETAR_RAFT____X", "MAGNETAR_"] {
            let err = load(ConfigLoader::new("MAGNETAR_"), &[(var, "1")]).unwrap_err();
            assert!(matches!(&err, ConfigError::UnknownEnv { var: v } if v == var), "{var}: {err:?}");
        }
    }

    #[test]
    fn log_vars_and_ignored_vars_are_not_config() {
        let cfg = load(
            ConfigLoader::new("MAGNETAR_").ignore_env("MAGNETAR_CONFIG"),
            &[("MAGNETAR_LOG", "debug"), ("MAGNETAR_LOG_FORMAT", "json"), ("MAGNETAR_CONFIG", "/etc/magnetar.toml")],
        )
        .unwrap();
        assert_eq!(cfg, TestConfig::default());
    }

    #[test]
    fn type_mismatch_names_key() {
        let f = write_file("[raft]\nheartbeat_ms = \"x\"\n");
        let err = load(ConfigLoader::new("MAGNETAR_").file(Some(f.path())), &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("raft.heartbeat_ms: invalid type: string \"x\", expected u64"), "{msg}");
    }

    #[test]
    fn type_mismatch_from_env_names_key_and_variable() {
        let msg = load(ConfigLoader::new("MAGNETAR_"), &[("MAGNETAR_BROKER__PORT", "70000")]).unwrap_err().to_string();
        assert!(msg.contains("broker.port"), "{msg}");
        assert!(msg.contains("MAGNETAR_BROKER__PORT"), "{msg}");
    }

    #[test]
    fn type_mismatch_inside_array_names_index() {
        let msg = load(ConfigLoader::new("MAGNETAR_").set("tags", "[\"a\", 3]"), &[]).unwrap_err().to_string();
        assert!(msg.contains("tags[1]"), "{msg}");
        assert!(msg.contains("override"), "{msg}");
    }

    #[test]
    fn bad_enum_variant_names_key() {
        let msg = load(ConfigLoader::new("MAGNETAR_").set("mode", "solo"), &[]).unwrap_err().to_string();
        assert!(msg.contains("mode: unknown variant `solo`"), "{msg}");
    }

    #[test]
    fn env_alias_maps_to_key_and_prefixed_var_wins() {
        let loader = || ConfigLoader::new("MAGNETAR_").env_alias("brokerServicePort", "broker.port");
        let cfg = load(loader(), &[("brokerServicePort", "6651")]).unwrap();
        assert_eq!(cfg.broker.port, 6651);

        let cfg = load(loader(), &[("brokerServicePort", "6651"), ("MAGNETAR_BROKER__PORT", "6652")]).unwrap();
        assert_eq!(cfg.broker.port, 6652);
    }

    #[test]
    fn prefixed_alias_is_not_reported_unknown() {
        let cfg = load(
            ConfigLoader::new("MAGNETAR_").env_alias("MAGNETAR_PORT", "broker.port"),
            &[("MAGNETAR_PORT", "7000")],
        )
        .unwrap();
        assert_eq!(cfg.broker.port, 7000);
    }

    #[test]
    fn string_default_stays_string() {
        let cfg =
            load(ConfigLoader::new("MAGNETAR_"), &[("MAGNETAR_NODE_ID", "007"), ("MAGNETAR_CLUSTER_NAME", "true")])
                .unwrap();
        assert_eq!(cfg.node_id, "007");
        assert_eq!(cfg.cluster_name, "true");
    }

    #[test]
    fn env_can_override_optional_key_set_in_file() {
        let f = write_file("advertised = \"a:1\"\n");
        let cfg = load(ConfigLoader::new("MAGNETAR_").file(Some(f.path())), &[("MAGNETAR_ADVERTISED", "b:2")]).unwrap();
        assert_eq!(cfg.advertised.as_deref(), Some("b:2"));
    }

    #[test]
    fn validate_error_surfaces() {
        let err = load(ConfigLoader::new("MAGNETAR_").set("raft.heartbeat_ms", "0"), &[]).unwrap_err();
        assert!(matches!(&err, ConfigError::Invalid { key, .. } if key == "raft.heartbeat_ms"), "{err:?}");
        assert_eq!(err.to_string(), "invalid value for `raft.heartbeat_ms`: must be > 0");

        let err = load(ConfigLoader::new("MAGNETAR_").set("broker.listen", "nope"), &[]).unwrap_err();
        assert!(err.to_string().contains("`broker.listen`"), "{err}");
    }

    #[test]
    fn missing_file_is_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        let err = load(ConfigLoader::new("MAGNETAR_").file(Some(&path)), &[]).unwrap_err();
        assert!(matches!(&err, ConfigError::Read { path: p, .. } if p == &path), "{err:?}");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn malformed_file_is_parse_error_with_path() {
        let f = write_file("[raft\nheartbeat_ms = 1\n");
        let err = load(ConfigLoader::new("MAGNETAR_").file(Some(f.path())), &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        assert!(err.to_string().contains(&f.path().display().to_string()));
    }

    #[test]
    fn malformed_set_key_is_rejected() {
        let err = load(ConfigLoader::new("MAGNETAR_").set("raft..x", "1"), &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
    }

    #[test]
    fn set_value_cannot_inject_extra_keys() {
        // Taken as a literal string, which then fails to be a u64.
        let msg = load(ConfigLoader::new("MAGNETAR_").set("raft.heartbeat_ms", "5\nenabled = false"), &[])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("raft.heartbeat_ms: invalid type: string"), "{msg}");
    }

    #[test]
    fn parse_value_types() {
        assert_eq!(parse_value("42", None), Value::Integer(42));
        assert_eq!(parse_value("1.5", None), Value::Float(1.5));
        assert_eq!(parse_value("true", None), Value::Boolean(true));
        assert_eq!(parse_value("[1, 2]", None), Value::Array(vec![Value::Integer(1), Value::Integer(2)]));
        assert_eq!(parse_value("hello world", None), Value::String("hello world".into()));
        assert_eq!(parse_value("42", Some(&Value::String(String::new()))), Value::String("42".into()));
    }

    #[test]
    fn socket_addr_helper() {
        assert_eq!(parse_socket_addr("k", "127.0.0.1:6650").unwrap(), "127.0.0.1:6650".parse::<SocketAddr>().unwrap());
        assert_eq!(parse_socket_addr("k", "[::1]:80").unwrap(), "[::1]:80".parse::<SocketAddr>().unwrap());
        assert_eq!(parse_socket_addr("k", "localhost:8080").unwrap(), "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        let err = parse_socket_addr("broker.listen", "localhost:99999").unwrap_err();
        assert!(err.to_string().contains("`broker.listen`"), "{err}");
        assert!(parse_socket_addr("k", "6650").is_err());
    }
}
