//! The broker's HTTP service (port 8080): the parts of Pulsar's admin REST API v2 built so far,
//! `/status.html`, and `/metrics` with Pulsar's topic metric names. Errors are Pulsar's:
//! `{"reason": "..."}` with 404 for unknown tenants, namespaces and topics, 409 on conflicts,
//! 412 on failed preconditions.
//!
//! Helpers return `Result<_, Response>` so a handler can return the error response they built
//! as is; the large error variant is deliberate.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use magnetar_metastore::client::{ClientError, MetaClient, PutOptions};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ownership::{BrokerInfo, Owner, Ownership};
use crate::protocol::names::TopicName;
use crate::topic::{
    partitioned_key, schema::schema_key, topic_key, topic_policies_key, Cmd, CreateAt, PartitionedMetadata, SubAnswer,
    SubError, SubOp, Topic, TopicError, Topics,
};

pub(crate) struct Admin {
    pub(crate) meta: MetaClient,
    pub(crate) topics: Arc<Topics>,
    pub(crate) connections: Arc<crate::server::Connections>,
    pub(crate) cluster: String,
    pub(crate) ownership: Arc<Ownership>,
    pub(crate) topic_level_metrics: bool,
}

type S = State<Arc<Admin>>;

fn json<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> Response {
    let text = serde_json::to_string(body).unwrap_or_else(|_| "null".into());
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

fn fail(status: StatusCode, reason: impl Into<String>) -> Response {
    json(status, &serde_json::json!({ "reason": reason.into() }))
}

fn meta_error(e: ClientError) -> Response {
    fail(StatusCode::SERVICE_UNAVAILABLE, format!("metastore: {e}"))
}

fn topic_error(e: TopicError) -> Response {
    match e {
        TopicError::NotFound(t) => fail(StatusCode::NOT_FOUND, format!("Topic {t} not found")),
        TopicError::Conflict(t) => fail(StatusCode::CONFLICT, format!("Topic {t} was changed concurrently")),
        TopicError::Refused(why) => fail(StatusCode::PRECONDITION_FAILED, why),
        e @ TopicError::NotOwned { .. } => fail(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        e => fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Children names one level under `prefix` (which ends in `/`).
async fn children(meta: &MetaClient, prefix: &str) -> Result<Vec<String>, ClientError> {
    let mut out: Vec<String> = meta
        .list(prefix)
        .await?
        .into_iter()
        .filter_map(|kv| kv.key[prefix.len()..].split('/').next().map(String::from))
        .collect();
    out.dedup();
    Ok(out)
}

async fn exists(meta: &MetaClient, key: &str) -> Result<bool, ClientError> {
    Ok(meta.get(key).await?.is_some())
}

/// Creates `key` with `body` unless it exists (409).
async fn create(meta: &MetaClient, key: &str, body: Vec<u8>, what: &str) -> Response {
    match meta.put(key, body, PutOptions { expected_version: Some(0), session: 0 }).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(ClientError::BadVersion { .. }) => fail(StatusCode::CONFLICT, format!("{what} already exists")),
        Err(e) => meta_error(e),
    }
}

async fn get_json(meta: &MetaClient, key: &str, what: &str) -> Response {
    match meta.get(key).await {
        Ok(Some(kv)) => {
            let v: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
            json(StatusCode::OK, &v)
        }
        Ok(None) => fail(StatusCode::NOT_FOUND, format!("{what} does not exist")),
        Err(e) => meta_error(e),
    }
}

/// Read-modify-write of a JSON document at `key` with a CAS on the version read: 404 when it
/// is missing, 409 when it changed meanwhile, 204 when stored.
async fn update_json(
    meta: &MetaClient,
    key: &str,
    what: &str,
    change: impl FnOnce(Value) -> Result<Value, Response>,
) -> Response {
    change_json(meta, key, what, false, change).await
}

/// As [`update_json`]; with `create`, a missing key starts as `{}`.
async fn change_json(
    meta: &MetaClient,
    key: &str,
    what: &str,
    create: bool,
    change: impl FnOnce(Value) -> Result<Value, Response>,
) -> Response {
    let (old, version) = match meta.get(key).await {
        Ok(Some(kv)) => (serde_json::from_slice(&kv.value).unwrap_or_else(|_| serde_json::json!({})), kv.version),
        Ok(None) if create => (serde_json::json!({}), 0),
        Ok(None) => return fail(StatusCode::NOT_FOUND, format!("{what} does not exist")),
        Err(e) => return meta_error(e),
    };
    let new = match change(old) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let body = serde_json::to_vec(&new).unwrap_or_default();
    match meta.put(key, body, PutOptions { expected_version: Some(version), session: 0 }).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(ClientError::BadVersion { .. }) => fail(StatusCode::CONFLICT, format!("{what} was changed concurrently")),
        Err(e) => meta_error(e),
    }
}

fn parse_object(body: &Bytes) -> Result<Value, Response> {
    if body.is_empty() {
        return Ok(serde_json::json!({}));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(fail(StatusCode::BAD_REQUEST, "expected a JSON object")),
        Err(e) => Err(fail(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}"))),
    }
}

async fn status() -> &'static str {
    "OK"
}

/// `ok` while the broker is registered with the metastore (and so may own topics); 503
/// while it has no session (it is opening a new one, or its id is held by another broker).
async fn health(State(a): S) -> Response {
    if a.ownership.registered() {
        "ok".into_response()
    } else {
        fail(StatusCode::SERVICE_UNAVAILABLE, "the broker is not registered with the metastore")
    }
}

async fn clusters(State(a): S) -> Response {
    match children(&a.meta, "/cluster/").await {
        Ok(c) => json(StatusCode::OK, &c),
        Err(e) => meta_error(e),
    }
}

async fn cluster(State(a): S, Path(c): Path<String>) -> Response {
    get_json(&a.meta, &format!("/cluster/{c}"), &format!("Cluster {c}")).await
}

async fn cluster_create(State(a): S, Path(c): Path<String>, body: Bytes) -> Response {
    if TopicName::parse(&format!("{c}/ns/x")).is_err() {
        return fail(StatusCode::PRECONDITION_FAILED, format!("Cluster name {c} is not valid"));
    }
    match parse_object(&body) {
        Ok(v) => {
            create(
                &a.meta,
                &format!("/cluster/{c}"),
                serde_json::to_vec(&v).unwrap_or_default(),
                &format!("Cluster {c}"),
            )
            .await
        }
        Err(r) => r,
    }
}

async fn cluster_update(State(a): S, Path(c): Path<String>, body: Bytes) -> Response {
    update_json(&a.meta, &format!("/cluster/{c}"), &format!("Cluster {c}"), |_| parse_object(&body)).await
}

async fn cluster_delete(State(a): S, Path(c): Path<String>) -> Response {
    if c == a.cluster {
        return fail(StatusCode::PRECONDITION_FAILED, format!("Cluster {c} is this broker's own cluster"));
    }
    match a.meta.delete(&format!("/cluster/{c}"), None).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => fail(StatusCode::NOT_FOUND, format!("Cluster {c} does not exist")),
        Err(e) => meta_error(e),
    }
}

async fn brokers(State(a): S, Path(c): Path<String>) -> Response {
    if c != a.cluster {
        return fail(StatusCode::NOT_FOUND, format!("Cluster {c} does not exist"));
    }
    match a.ownership.brokers().await {
        Ok(list) => json(
            StatusCode::OK,
            &list.iter().map(|b| b.http_url.trim_start_matches("http://").to_owned()).collect::<Vec<_>>(),
        ),
        Err(e) => meta_error(e),
    }
}

async fn tenants(State(a): S) -> Response {
    match children(&a.meta, "/tenants/").await {
        Ok(t) => json(StatusCode::OK, &t),
        Err(e) => meta_error(e),
    }
}

async fn tenant_get(State(a): S, Path(t): Path<String>) -> Response {
    get_json(&a.meta, &format!("/tenants/{t}"), &format!("Tenant {t}")).await
}

fn tenant_body(body: &Bytes) -> Result<Value, Response> {
    let mut v = parse_object(body)?;
    let o = v.as_object_mut().ok_or_else(|| fail(StatusCode::BAD_REQUEST, "expected a JSON object"))?;
    o.entry("adminRoles").or_insert_with(|| serde_json::json!([]));
    o.entry("allowedClusters").or_insert_with(|| serde_json::json!([]));
    Ok(v)
}

/// 412 unless every cluster a tenant names exists.
async fn check_clusters(a: &Admin, tenant: &Value) -> Result<(), Response> {
    let known = children(&a.meta, "/cluster/").await.map_err(meta_error)?;
    let missing: Vec<&str> = tenant["allowedClusters"]
        .as_array()
        .map(|l| l.iter().filter_map(|c| c.as_str()).filter(|c| !known.iter().any(|k| k == c)).collect())
        .unwrap_or_default();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(fail(StatusCode::PRECONDITION_FAILED, format!("Clusters do not exist: {}", missing.join(", "))))
    }
}

async fn tenant_create(State(a): S, Path(t): Path<String>, body: Bytes) -> Response {
    if TopicName::parse(&format!("{t}/ns/x")).is_err() {
        return fail(StatusCode::PRECONDITION_FAILED, format!("Tenant name {t} is not valid"));
    }
    let v = match tenant_body(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = check_clusters(&a, &v).await {
        return r;
    }
    let b = serde_json::to_vec(&v).unwrap_or_default();
    create(&a.meta, &format!("/tenants/{t}"), b, &format!("Tenant {t}")).await
}

async fn tenant_update(State(a): S, Path(t): Path<String>, body: Bytes) -> Response {
    let v = match tenant_body(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = check_clusters(&a, &v).await {
        return r;
    }
    update_json(&a.meta, &format!("/tenants/{t}"), &format!("Tenant {t}"), |_| Ok(v)).await
}

async fn tenant_delete(State(a): S, Path(t): Path<String>) -> Response {
    match exists(&a.meta, &format!("/tenants/{t}")).await {
        Ok(true) => {}
        Ok(false) => return fail(StatusCode::NOT_FOUND, format!("Tenant {t} does not exist")),
        Err(e) => return meta_error(e),
    }
    match children(&a.meta, &format!("/namespaces/{t}/")).await {
        Ok(ns) if !ns.is_empty() => {
            return fail(StatusCode::CONFLICT, format!("Tenant {t} still has namespaces: {ns:?}"))
        }
        Ok(_) => {}
        Err(e) => return meta_error(e),
    }
    match a.meta.delete(&format!("/tenants/{t}"), None).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => meta_error(e),
    }
}

async fn namespaces(State(a): S, Path(t): Path<String>) -> Response {
    match exists(&a.meta, &format!("/tenants/{t}")).await {
        Ok(true) => {}
        Ok(false) => return fail(StatusCode::NOT_FOUND, format!("Tenant {t} does not exist")),
        Err(e) => return meta_error(e),
    }
    match children(&a.meta, &format!("/namespaces/{t}/")).await {
        Ok(ns) => json(StatusCode::OK, &ns.iter().map(|n| format!("{t}/{n}")).collect::<Vec<_>>()),
        Err(e) => meta_error(e),
    }
}

async fn namespace_get(State(a): S, Path((t, ns)): Path<(String, String)>) -> Response {
    get_json(&a.meta, &format!("/namespaces/{t}/{ns}"), &format!("Namespace {t}/{ns}")).await
}

async fn namespace_create(State(a): S, Path((t, ns)): Path<(String, String)>, body: Bytes) -> Response {
    match exists(&a.meta, &format!("/tenants/{t}")).await {
        Ok(true) => {}
        Ok(false) => return fail(StatusCode::NOT_FOUND, format!("Tenant {t} does not exist")),
        Err(e) => return meta_error(e),
    }
    if TopicName::parse(&format!("{t}/{ns}/x")).is_err() {
        return fail(StatusCode::PRECONDITION_FAILED, format!("Namespace name {t}/{ns} is not valid"));
    }
    let mut policies = match parse_object(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Some(o) = policies.as_object_mut() {
        o.entry("bundles").or_insert_with(|| serde_json::json!({ "numBundles": 4 }));
        o.entry("replication_clusters").or_insert_with(|| serde_json::json!([a.cluster.clone()]));
    }
    let body = serde_json::to_vec(&policies).unwrap_or_default();
    create(&a.meta, &format!("/namespaces/{t}/{ns}"), body, &format!("Namespace {t}/{ns}")).await
}

async fn namespace_delete(State(a): S, Path((t, ns)): Path<(String, String)>) -> Response {
    match exists(&a.meta, &format!("/namespaces/{t}/{ns}")).await {
        Ok(true) => {}
        Ok(false) => return fail(StatusCode::NOT_FOUND, format!("Namespace {t}/{ns} does not exist")),
        Err(e) => return meta_error(e),
    }
    match a.topics.list_namespace(&format!("{t}/{ns}")).await {
        Ok(topics) if !topics.is_empty() => {
            return fail(StatusCode::CONFLICT, format!("Namespace {t}/{ns} still has {} topic(s)", topics.len()))
        }
        Ok(_) => {}
        Err(e) => return topic_error(e),
    }
    match a.meta.delete(&format!("/namespaces/{t}/{ns}"), None).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => meta_error(e),
    }
}

/// Namespace policies: (URL segment, stored field, what the body must be).
const POLICIES: &[(&str, &str, Kind)] = &[
    ("retention", "retention_policies", Kind::Object),
    ("messageTTL", "message_ttl_in_seconds", Kind::Number),
    ("deduplication", "deduplicationEnabled", Kind::Bool),
    ("backlogQuota", "backlog_quota_map", Kind::Object),
    ("backlogQuotaMap", "backlog_quota_map", Kind::Object),
    ("bundles", "bundles", Kind::Object),
];

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Object,
    Number,
    Bool,
}

fn policy(segment: &str) -> Option<(&'static str, Kind)> {
    POLICIES.iter().find(|p| p.0 == segment).map(|p| (p.1, p.2))
}

async fn policy_get(State(a): S, Path((t, ns, segment)): Path<(String, String, String)>) -> Response {
    let Some((field, _)) = policy(&segment) else {
        return fail(StatusCode::NOT_FOUND, format!("unknown namespace policy {segment}"));
    };
    match a.meta.get(&format!("/namespaces/{t}/{ns}")).await {
        Ok(Some(kv)) => {
            let v: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
            json(StatusCode::OK, &v.get(field).cloned().unwrap_or(Value::Null))
        }
        Ok(None) => fail(StatusCode::NOT_FOUND, format!("Namespace {t}/{ns} does not exist")),
        Err(e) => meta_error(e),
    }
}

/// [`update_json`] on namespace `t/ns`'s policies.
async fn update_namespace(
    a: &Admin,
    t: &str,
    ns: &str,
    change: impl FnOnce(Value) -> Result<Value, Response>,
) -> Response {
    update_json(&a.meta, &format!("/namespaces/{t}/{ns}"), &format!("Namespace {t}/{ns}"), change).await
}

/// The stored field (and kind) of a namespace policy that requests may change (`verb`: "set" or
/// "removed"), or why not.
fn changeable_policy(segment: &str, verb: &str) -> Result<(&'static str, Kind), Response> {
    let Some((field, kind)) = policy(segment) else {
        return Err(fail(StatusCode::NOT_FOUND, format!("unknown namespace policy {segment}")));
    };
    match segment {
        // Topics' owners are found by bundle: the count is fixed when the namespace is made.
        "bundles" => Err(fail(StatusCode::PRECONDITION_FAILED, "bundles are set when the namespace is created")),
        "backlogQuotaMap" => {
            Err(fail(StatusCode::METHOD_NOT_ALLOWED, format!("quotas are {verb} through backlogQuota")))
        }
        _ => Ok((field, kind)),
    }
}

/// Stores one policy (CAS on the namespace's version). Topics apply retention (see
/// `topic::Retention`), the message TTL, deduplication and the backlog quota; permissions are
/// kept so tools and later versions see them.
async fn policy_set(
    State(a): S,
    Path((t, ns, segment)): Path<(String, String, String)>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
    body: Bytes,
) -> Response {
    let (field, kind) = match changeable_policy(&segment, "set") {
        Ok(f) => f,
        Err(r) => return r,
    };
    if segment == "backlogQuota" {
        return backlog_quota_set(&a, &t, &ns, q.as_deref(), &body).await;
    }
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return fail(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
    };
    let retention_ok = |v: &Value| {
        ["retentionTimeInMinutes", "retentionSizeInMB"]
            .iter()
            .all(|k| v.get(k).and_then(Value::as_i64).is_some_and(|n| n >= -1))
    };
    let fits = match kind {
        Kind::Object if segment == "retention" => retention_ok(&value),
        Kind::Object => value.is_object(),
        Kind::Number => value.as_i64().is_some_and(|n| n >= 0),
        Kind::Bool => value.is_boolean(),
    };
    if !fits {
        return fail(StatusCode::PRECONDITION_FAILED, format!("invalid value for {segment}: {value}"));
    }
    if segment == "retention" {
        let zero = |k: &str| value.get(k).and_then(Value::as_i64) == Some(0);
        if zero("retentionTimeInMinutes") != zero("retentionSizeInMB") {
            // As Pulsar: 0 turns retention off, so a single 0 would silently void the other
            // limit; -1 is how one limit is left out.
            return fail(
                StatusCode::BAD_REQUEST,
                "Invalid retention policy: a single limit of 0 with the other non-zero is not allowed; use -1 to leave a limit out, or 0 for both to keep nothing",
            );
        }
    }
    update_namespace(&a, &t, &ns, |mut policies| {
        if let Some(o) = policies.as_object_mut() {
            o.insert(field.into(), value);
        }
        Ok(policies)
    })
    .await
}

/// Removes one policy (`remove-message-ttl`, `remove-retention`, …): the broker's defaults
/// apply again.
async fn policy_delete(
    State(a): S,
    Path((t, ns, segment)): Path<(String, String, String)>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    let (field, _) = match changeable_policy(&segment, "removed") {
        Ok(f) => f,
        Err(r) => return r,
    };
    // `remove-backlog-quota` removes one type's quota (`destination_storage` by default).
    let quota_type = (segment == "backlogQuota").then(|| backlog_quota_type(q.as_deref()));
    if let Some(kind) = quota_type.filter(|k| !QUOTA_TYPES.contains(k)) {
        return fail(StatusCode::PRECONDITION_FAILED, format!("unknown backlog quota type {kind}"));
    }
    update_namespace(&a, &t, &ns, |mut policies| {
        if let Some(o) = policies.as_object_mut() {
            match quota_type {
                Some(kind) => {
                    if let Some(m) = o.get_mut(field).and_then(Value::as_object_mut) {
                        m.remove(kind);
                    }
                }
                None => {
                    o.remove(field);
                }
            }
        }
        Ok(policies)
    })
    .await
}

/// Pulsar's backlog quota types: by size (enforced) and by message age (stored).
const QUOTA_TYPES: [&str; 2] = ["destination_storage", "message_age"];

/// The quota type a request names (`?backlogQuotaType=`), `destination_storage` by default.
fn backlog_quota_type(q: Option<&str>) -> &str {
    q.unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("backlogQuotaType=")).unwrap_or("destination_storage")
}

/// `namespaces set-backlog-quota`: the body is one quota (`{"limitSize", "limitTime",
/// "policy"}`) for the type the query names, stored in `backlog_quota_map` under it as Pulsar
/// stores it; a whole map (`{"destination_storage": {…}}`) is taken too. Only the
/// `destination_storage` (size) quota is enforced.
async fn backlog_quota_set(a: &Admin, t: &str, ns: &str, q: Option<&str>, body: &Bytes) -> Response {
    let value: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(v) => return fail(StatusCode::PRECONDITION_FAILED, format!("invalid value for backlogQuota: {v}")),
        Err(e) => return fail(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
    };
    let quotas: Vec<(String, Value)> = match value.as_object() {
        Some(m) if QUOTA_TYPES.iter().any(|k| m.contains_key(*k)) => {
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        }
        _ => vec![(backlog_quota_type(q).to_owned(), value)],
    };
    for (kind, quota) in &quotas {
        if !QUOTA_TYPES.contains(&kind.as_str()) {
            return fail(StatusCode::PRECONDITION_FAILED, format!("unknown backlog quota type {kind}"));
        }
        if kind == "destination_storage" {
            if let Err(e) = crate::topic::quota::BacklogQuota::from_json(quota) {
                return fail(StatusCode::PRECONDITION_FAILED, e);
            }
        }
    }
    update_namespace(a, t, ns, |mut policies| {
        if let Some(o) = policies.as_object_mut() {
            let map = o.entry("backlog_quota_map").or_insert_with(|| serde_json::json!({}));
            if !map.is_object() {
                *map = serde_json::json!({});
            }
            if let Some(m) = map.as_object_mut() {
                m.extend(quotas);
            }
        }
        Ok(policies)
    })
    .await
}

/// Grants `role` actions on a namespace (stored in `auth_policies`; enforced once
/// authorization exists).
async fn permission_grant(State(a): S, Path((t, ns, role)): Path<(String, String, String)>, body: Bytes) -> Response {
    let actions: Vec<String> = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return fail(StatusCode::BAD_REQUEST, format!("expected a list of actions: {e}")),
    };
    if let Some(bad) = actions
        .iter()
        .find(|x| !["produce", "consume", "functions", "sources", "sinks", "packages"].contains(&x.as_str()))
    {
        return fail(StatusCode::PRECONDITION_FAILED, format!("unknown action {bad}"));
    }
    update_namespace(&a, &t, &ns, |mut policies| {
        policies["auth_policies"]["namespace_auth"][role.as_str()] = serde_json::json!(actions);
        Ok(policies)
    })
    .await
}

async fn permissions_get(State(a): S, Path((t, ns)): Path<(String, String)>) -> Response {
    match a.meta.get(&format!("/namespaces/{t}/{ns}")).await {
        Ok(Some(kv)) => {
            let v: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
            json(StatusCode::OK, &v["auth_policies"]["namespace_auth"].as_object().cloned().unwrap_or_default())
        }
        Ok(None) => fail(StatusCode::NOT_FOUND, format!("Namespace {t}/{ns} does not exist")),
        Err(e) => meta_error(e),
    }
}

/// 404 unless the namespace exists.
async fn check_namespace(a: &Admin, t: &str, ns: &str) -> Option<Response> {
    match exists(&a.meta, &format!("/namespaces/{t}/{ns}")).await {
        Ok(true) => None,
        Ok(false) => Some(fail(StatusCode::NOT_FOUND, format!("Namespace {t}/{ns} does not exist"))),
        Err(e) => Some(meta_error(e)),
    }
}

fn name(t: &str, ns: &str, topic: &str) -> Result<TopicName, Response> {
    TopicName::parse(&format!("persistent://{t}/{ns}/{topic}"))
        .map_err(|e| fail(StatusCode::PRECONDITION_FAILED, e.to_string()))
}

/// A topic's own policy `key` (`pulsar-admin topics get-message-ttl`, `get-deduplication`),
/// `null` when it has none. Topic policies live in the metastore, so any broker serves them.
async fn topic_policy_get(a: &Admin, (t, ns, topic): (String, String, String), key: &str) -> Response {
    let n = match name(&t, &ns, &topic) {
        Ok(n) => n,
        Err(r) => return r,
    };
    if let Err(r) = topic_or_partitioned(a, &n).await {
        return r;
    }
    match a.meta.get(&topic_policies_key(&n)).await {
        Ok(kv) => {
            let policies: Value = kv.and_then(|kv| serde_json::from_slice(&kv.value).ok()).unwrap_or_default();
            json(StatusCode::OK, &policies.get(key).cloned().unwrap_or(Value::Null))
        }
        Err(e) => meta_error(e),
    }
}

/// Sets a topic's own policy `key` over its namespace's (for every partition, when set on a
/// partitioned topic); 404 for a topic that does not exist.
async fn topic_policy_set(a: &Admin, (t, ns, topic): (String, String, String), key: &str, value: Value) -> Response {
    let n = match name(&t, &ns, &topic) {
        Ok(n) => n,
        Err(r) => return r,
    };
    if let Err(r) = topic_or_partitioned(a, &n).await {
        return r;
    }
    change_json(&a.meta, &topic_policies_key(&n), &format!("Topic policies of {n}"), true, |mut policies| {
        if let Some(o) = policies.as_object_mut() {
            o.insert(key.into(), value);
        }
        Ok(policies)
    })
    .await
}

/// Removes a topic's own policy `key`: its namespace's applies again.
async fn topic_policy_remove(a: &Admin, (t, ns, topic): (String, String, String), key: &str) -> Response {
    let n = match name(&t, &ns, &topic) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let policies = topic_policies_key(&n);
    match a.meta.get(&policies).await {
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Ok(Some(_)) => {
            change_json(&a.meta, &policies, &format!("Topic policies of {n}"), false, |mut p| {
                if let Some(o) = p.as_object_mut() {
                    o.remove(key);
                }
                Ok(p)
            })
            .await
        }
        Err(e) => meta_error(e),
    }
}

/// Whether a GET asks for the policy in effect (`?applied=true`, `pulsar-admin … --applied`)
/// rather than the topic's own.
fn applied(q: &Option<String>) -> bool {
    q.as_deref().unwrap_or("").split('&').any(|kv| kv == "applied=true")
}

/// The policy in effect for a topic: its own `key`, its partitioned topic's, its namespace's
/// `namespace_key`, else the broker's `default`.
async fn applied_get<T: Into<Value>>(
    a: &Admin,
    (t, ns, topic): (String, String, String),
    key: &str,
    namespace_key: &str,
    read: fn(&Value) -> Option<T>,
    default: T,
) -> Response {
    let n = match name(&t, &ns, &topic) {
        Ok(n) => n,
        Err(r) => return r,
    };
    if let Err(r) = topic_or_partitioned(a, &n).await {
        return r;
    }
    match crate::topic::applied_policy(&a.meta, &n, key, namespace_key, read).await {
        Ok(v) => json(StatusCode::OK, &v.unwrap_or(default).into()),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn topic_ttl_get(
    State(a): S,
    Path(p): TopicPath,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    if applied(&q) {
        let default = a.topics.settings().message_ttl;
        return applied_get(&a, p, "messageTTL", "message_ttl_in_seconds", Value::as_u64, default).await;
    }
    topic_policy_get(&a, p, "messageTTL").await
}

/// `POST …/messageTTL?messageTTL=<seconds>` (`topics set-message-ttl`): overrides the
/// namespace's TTL for this topic; 0 turns expiry off for it.
async fn topic_ttl_set(
    State(a): S,
    Path(p): TopicPath,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    let ttl = q.as_deref().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("messageTTL="));
    let Some(ttl) = ttl.and_then(|v| v.parse::<u64>().ok()) else {
        return fail(StatusCode::PRECONDITION_FAILED, "messageTTL must be given as a number of seconds, 0 or more");
    };
    topic_policy_set(&a, p, "messageTTL", ttl.into()).await
}

/// `topics remove-message-ttl`.
async fn topic_ttl_delete(State(a): S, Path(p): TopicPath) -> Response {
    topic_policy_remove(&a, p, "messageTTL").await
}

/// `topics get-deduplication`: the topic's own `deduplicationEnabled`, `null` when unset
/// (with `?applied=true`, the policy in effect).
async fn topic_dedup_get(
    State(a): S,
    Path(p): TopicPath,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    if applied(&q) {
        let (key, default) = ("deduplicationEnabled", a.topics.settings().deduplication);
        return applied_get(&a, p, key, key, Value::as_bool, default).await;
    }
    topic_policy_get(&a, p, "deduplicationEnabled").await
}

/// `POST …/deduplicationEnabled` with body `true` or `false` (`topics set-deduplication
/// --enable|--disable`): over the namespace's policy and the broker's default.
async fn topic_dedup_set(State(a): S, Path(p): TopicPath, body: Bytes) -> Response {
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Bool(on)) => topic_policy_set(&a, p, "deduplicationEnabled", on.into()).await,
        _ => fail(StatusCode::PRECONDITION_FAILED, "the body must be true or false"),
    }
}

/// `topics remove-deduplication`.
async fn topic_dedup_delete(State(a): S, Path(p): TopicPath) -> Response {
    topic_policy_remove(&a, p, "deduplicationEnabled").await
}

/// `pulsar-admin schemas get` (`GET /admin/v2/schemas/{tenant}/{namespace}/{topic}/schema`):
/// the topic's latest schema, 404 when it has none.
async fn schema_get(State(a): S, Path((t, ns, topic)): Path<(String, String, String)>) -> Response {
    schema_answer(&a, &t, &ns, &topic, None).await
}

/// `pulsar-admin schemas get --version N`.
async fn schema_get_version(
    State(a): S,
    Path((t, ns, topic, version)): Path<(String, String, String, String)>,
) -> Response {
    match version.parse::<u64>() {
        Ok(v) => schema_answer(&a, &t, &ns, &topic, Some(v)).await,
        Err(_) => fail(StatusCode::PRECONDITION_FAILED, "a schema version is a number"),
    }
}

async fn schema_answer(a: &Admin, t: &str, ns: &str, topic: &str, version: Option<u64>) -> Response {
    let n = match name(t, ns, topic) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match crate::topic::schema::get(&a.meta, &n, version).await {
        Ok(Some((v, s))) => {
            let properties: serde_json::Map<String, Value> =
                s.properties.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect();
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "version": v,
                    "type": crate::topic::schema::type_name(s.kind),
                    "timestamp": s.timestamp,
                    "data": String::from_utf8_lossy(&s.data()),
                    "properties": properties,
                }),
            )
        }
        Ok(None) => fail(StatusCode::NOT_FOUND, format!("No schema found for {n}")),
        Err((_, why)) => fail(StatusCode::INTERNAL_SERVER_ERROR, why),
    }
}

/// `pulsar-admin schemas delete`: every version goes; the next producer with a schema
/// registers the next number (messages stored with an old one may remain), as in Pulsar.
/// Answers the last version deleted (`null` when there was none).
async fn schema_delete(State(a): S, Path((t, ns, topic)): Path<(String, String, String)>) -> Response {
    let n = match name(&t, &ns, &topic) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match crate::topic::schema::delete_all(&a.meta, &n).await {
        Ok(v) => json(StatusCode::OK, &serde_json::json!({ "version": v })),
        Err((_, why)) => fail(StatusCode::INTERNAL_SERVER_ERROR, why),
    }
}

/// 404 unless `n` is a topic, a partitioned topic or a partition of one (partitions are
/// stored once first loaded).
async fn topic_or_partitioned(a: &Admin, n: &TopicName) -> Result<(), Response> {
    let whole = if n.partition().is_some() { partitioned_key(&n.partitioned_parent()) } else { partitioned_key(n) };
    match (exists(&a.meta, &topic_key(n)).await, exists(&a.meta, &whole).await) {
        (Ok(false), Ok(false)) => Err(fail(StatusCode::NOT_FOUND, format!("Topic {n} not found"))),
        (Ok(_), Ok(_)) => Ok(()),
        (Err(e), _) | (_, Err(e)) => Err(meta_error(e)),
    }
}

async fn topics_list(State(a): S, Path((t, ns)): Path<(String, String)>) -> Response {
    if let Some(r) = check_namespace(&a, &t, &ns).await {
        return r;
    }
    match a.topics.list_namespace(&format!("{t}/{ns}")).await {
        Ok(list) => json(StatusCode::OK, &list),
        Err(e) => topic_error(e),
    }
}

async fn partitioned_list(State(a): S, Path((t, ns)): Path<(String, String)>) -> Response {
    if let Some(r) = check_namespace(&a, &t, &ns).await {
        return r;
    }
    match children(&a.meta, &format!("/partitioned/persistent/{t}/{ns}/")).await {
        Ok(list) => {
            json(StatusCode::OK, &list.iter().map(|x| format!("persistent://{t}/{ns}/{x}")).collect::<Vec<_>>())
        }
        Err(e) => meta_error(e),
    }
}

async fn topic_create(State(a): S, Path((t, ns, topic)): Path<(String, String, String)>) -> Response {
    if let Some(r) = check_namespace(&a, &t, &ns).await {
        return r;
    }
    let n = match name(&t, &ns, &topic) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match (exists(&a.meta, &topic_key(&n)).await, exists(&a.meta, &partitioned_key(&n)).await) {
        (Ok(false), Ok(false)) => {}
        (Ok(_), Ok(_)) => return fail(StatusCode::CONFLICT, format!("Topic {n} already exists")),
        (Err(e), _) | (_, Err(e)) => return meta_error(e),
    }
    match a.topics.get_or_load(&n).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => topic_error(e),
    }
}

async fn topic_delete(
    State(a): S,
    Path((t, ns, topic)): Path<(String, String, String)>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    let n = match name(&t, &ns, &topic) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match a.topics.delete(&n, parse_force(q.as_deref())).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => topic_error(e),
    }
}

/// `?force` or `?force=true`.
fn parse_force(q: Option<&str>) -> bool {
    q.unwrap_or("").split('&').any(|kv| kv == "force" || kv == "force=true")
}

async fn partitions_delete(
    State(a): S,
    Path((t, ns, topic)): Path<(String, String, String)>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    let n = match name(&t, &ns, &topic) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let force = parse_force(q.as_deref());
    let count = match a.topics.partitions(&n).await {
        Ok(0) => return fail(StatusCode::NOT_FOUND, format!("Partitioned topic {n} does not exist")),
        Ok(c) => c,
        Err(e) => return topic_error(e),
    };
    for i in 0..count {
        let p = n.partition_name(i);
        let q = if force { "?force=true" } else { "" };
        match at_owner(&a, &p, "DELETE", &format!("{}{q}", admin_path(&p))).await {
            Ok(Some((204 | 404, _))) => continue,
            Ok(Some((status, body))) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
            }
            Ok(None) => {}
            Err(r) => return r,
        }
        match a.topics.delete(&p, force).await {
            Ok(()) | Err(TopicError::NotFound(_)) => {}
            Err(e) => return topic_error(e),
        }
    }
    // Its policies first: left behind, they would apply to a topic created later under the
    // same name. Its schemas go with the partition count, in one transaction: a producer
    // registering a schema meanwhile compares the count's record (see `schema::get_or_create`).
    if let Err(e) = a.meta.delete(&topic_policies_key(&n), None).await {
        return meta_error(e);
    }
    let txn = magnetar_metastore::client::Txn::default().delete(schema_key(&n)).delete(partitioned_key(&n));
    match a.meta.txn(txn).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => meta_error(e),
    }
}

/// The topic, loaded; 404 when it does not exist.
async fn existing(a: &Admin, n: &TopicName) -> Result<Topic, Response> {
    match exists(&a.meta, &topic_key(n)).await {
        Ok(true) => {}
        Ok(false) => return Err(fail(StatusCode::NOT_FOUND, format!("Topic {n} not found"))),
        Err(e) => return Err(meta_error(e)),
    }
    a.topics.get_or_load(n).await.map_err(topic_error)
}

/// The topic a request path names, loaded; 412 for a bad name, 404 if it does not exist.
async fn existing_at(a: &Admin, t: &str, ns: &str, topic: &str) -> Result<(TopicName, Topic), Response> {
    let n = name(t, ns, topic)?;
    let loaded = existing(a, &n).await?;
    Ok((n, loaded))
}

type TopicPath = Path<(String, String, String)>;
type SubPath = Path<(String, String, String, String)>;

async fn subscriptions(State(a): S, Path((t, ns, topic)): TopicPath) -> Response {
    let n = match existing_at(&a, &t, &ns, &topic).await {
        Ok((n, _)) => n,
        Err(r) => return r,
    };
    match children(&a.meta, &format!("{}/cursors/", topic_key(&n))).await {
        Ok(subs) => {
            json(StatusCode::OK, &subs.iter().map(|s| s.replace("%2F", "/").replace("%25", "%")).collect::<Vec<_>>())
        }
        Err(e) => meta_error(e),
    }
}

async fn sub_op(a: &Admin, t: &str, ns: &str, topic: &str, sub: &str, op: SubOp) -> Response {
    let (_, topic) = match existing_at(a, t, ns, topic).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let answer = match topic.ask(|done| Cmd::SubAdmin { sub: sub.to_owned(), op, done }).await {
        Ok(x) => x,
        Err(e) => return topic_error(e),
    };
    match answer {
        Ok(SubAnswer::Done) => StatusCode::NO_CONTENT.into_response(),
        Ok(SubAnswer::Peeked { position, entry }) => match crate::protocol::codec::decode_entry(&entry) {
            Ok((md, payload)) => (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (header::HeaderName::from_static("x-pulsar-message-id"), position.to_string()),
                    (header::HeaderName::from_static("x-pulsar-publish-time"), md.publish_time.to_string()),
                    (
                        header::HeaderName::from_static("x-pulsar-num-batch-message"),
                        md.num_messages_in_batch.unwrap_or(1).to_string(),
                    ),
                ],
                payload,
            )
                .into_response(),
            Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, format!("stored entry does not decode: {e}")),
        },
        Err(SubError::NotFound(m)) => fail(StatusCode::NOT_FOUND, m),
        Err(SubError::Conflict(m)) => fail(StatusCode::CONFLICT, m),
        Err(SubError::Precondition(m)) => fail(StatusCode::PRECONDITION_FAILED, m),
        Err(SubError::Failed(m)) => fail(StatusCode::INTERNAL_SERVER_ERROR, m),
    }
}

async fn sub_create(State(a): S, Path((t, ns, topic, sub)): SubPath, body: Bytes) -> Response {
    let at = if body.iter().all(|b| b.is_ascii_whitespace()) {
        CreateAt::Latest
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v) => match (v["ledgerId"].as_i64(), v["entryId"].as_i64()) {
                (Some(-1), _) => CreateAt::Earliest,
                (Some(i64::MAX), _) => CreateAt::Latest,
                (Some(l), Some(e)) if l >= 0 && e >= 0 => CreateAt::Id(l as u64, e),
                _ => return fail(StatusCode::PRECONDITION_FAILED, "expected {\"ledgerId\": …, \"entryId\": …}"),
            },
            Err(e) => return fail(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
        }
    };
    sub_op(&a, &t, &ns, &topic, &sub, SubOp::Create(at)).await
}

async fn sub_delete(
    State(a): S,
    Path((t, ns, topic, sub)): SubPath,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    sub_op(&a, &t, &ns, &topic, &sub, SubOp::Delete { force: parse_force(q.as_deref()) }).await
}

async fn sub_skip(State(a): S, Path((t, ns, topic, sub, n)): Path<(String, String, String, String, u64)>) -> Response {
    sub_op(&a, &t, &ns, &topic, &sub, SubOp::Skip(n)).await
}

async fn sub_skip_all(State(a): S, Path((t, ns, topic, sub)): SubPath) -> Response {
    sub_op(&a, &t, &ns, &topic, &sub, SubOp::SkipAll).await
}

async fn sub_expire(
    State(a): S,
    Path((t, ns, topic, sub, secs)): Path<(String, String, String, String, u64)>,
) -> Response {
    sub_op(&a, &t, &ns, &topic, &sub, SubOp::Expire(secs)).await
}

async fn sub_reset(
    State(a): S,
    Path((t, ns, topic, sub, ts)): Path<(String, String, String, String, u64)>,
) -> Response {
    sub_op(&a, &t, &ns, &topic, &sub, SubOp::ResetToTime(ts)).await
}

async fn sub_peek(State(a): S, Path((t, ns, topic, sub, n)): Path<(String, String, String, String, u64)>) -> Response {
    sub_op(&a, &t, &ns, &topic, &sub, SubOp::Peek(n)).await
}

async fn internal_stats(State(a): S, Path((t, ns, topic)): TopicPath) -> Response {
    match existing_at(&a, &t, &ns, &topic).await {
        Ok((_, topic)) => match topic.ask(|done| Cmd::Internal { done }).await {
            Ok(v) => json(StatusCode::OK, &v),
            Err(e) => topic_error(e),
        },
        Err(r) => r,
    }
}

async fn last_message_id(State(a): S, Path((t, ns, topic)): TopicPath) -> Response {
    match existing_at(&a, &t, &ns, &topic).await {
        Ok((n, topic)) => match topic.ask(|done| Cmd::LastId { done }).await {
            Ok(id) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "ledgerId": id.ledger_id,
                    "entryId": id.entry_id as i64,
                    "partitionIndex": n.partition().map(|p| p as i64).unwrap_or(-1),
                    "batchIndex": id.batch_index.unwrap_or(-1),
                }),
            ),
            Err(e) => topic_error(e),
        },
        Err(r) => r,
    }
}

async fn terminate(State(a): S, Path((t, ns, topic)): TopicPath) -> Response {
    let (n, topic) = match existing_at(&a, &t, &ns, &topic).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match topic.ask(|done| Cmd::Terminate { done }).await {
        Ok(Ok(id)) => json(
            StatusCode::OK,
            &serde_json::json!({
                "ledgerId": id.ledger_id,
                "entryId": id.entry_id as i64,
                "partitionIndex": n.partition().map(|p| p as i64).unwrap_or(-1),
            }),
        ),
        Ok(Err(e)) => fail(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => topic_error(e),
    }
}

async fn unload(State(a): S, Path((t, ns, topic)): TopicPath) -> Response {
    let n = match name(&t, &ns, &topic) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match exists(&a.meta, &topic_key(&n)).await {
        Ok(true) => {
            a.topics.unload(&n).await;
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => fail(StatusCode::NOT_FOUND, format!("Topic {n} not found")),
        Err(e) => meta_error(e),
    }
}

/// `/lookup/v2/topic/persistent/{t}/{ns}/{topic}`: the owner's URLs, or a redirect to the
/// broker a free bundle is assigned to.
async fn lookup(State(a): S, Path((t, ns, topic)): TopicPath, uri: axum::http::Uri) -> Response {
    let n = match name(&t, &ns, &topic) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let owner = match a.ownership.resolve(&n, authoritative(uri.query())).await {
        Ok(Owner::Me) => a.ownership.me().clone(),
        Ok(Owner::Other(b)) => b,
        Ok(Owner::Candidate(b)) => return redirect(&b, &uri, true),
        Err(e) => return fail(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    json(
        StatusCode::OK,
        &serde_json::json!({
            "brokerUrl": owner.broker_url,
            "httpUrl": owner.http_url,
            "nativeUrl": owner.broker_url,
        }),
    )
}

/// `authoritative=true` in a query.
fn authoritative(q: Option<&str>) -> bool {
    q.unwrap_or("").split('&').any(|kv| kv == "authoritative=true")
}

/// 307 to the same path and query at broker `b` (marked authoritative when `b` is to take
/// the bundle).
fn redirect(b: &BrokerInfo, uri: &axum::http::Uri, authoritative: bool) -> Response {
    if b.http_url.is_empty() {
        return fail(StatusCode::SERVICE_UNAVAILABLE, format!("served by {}, which has no HTTP service", b.broker_id));
    }
    let mut query = uri.query().unwrap_or("").to_owned();
    if authoritative && !self::authoritative(Some(&query)) {
        query = if query.is_empty() { "authoritative=true".into() } else { format!("{query}&authoritative=true") };
    }
    let sep = if query.is_empty() { "" } else { "?" };
    let location = format!("{}{}{sep}{query}", b.http_url, uri.path());
    (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response()
}

/// Topic routes are served by the topic's owner: requests for topics owned elsewhere (or
/// assigned elsewhere) are redirected there, as Pulsar's brokers do.
async fn to_owner(State(a): S, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let uri = req.uri().clone();
    let rest = uri.path().strip_prefix("/admin/v2/persistent/").unwrap_or("");
    let parts: Vec<&str> = rest.splitn(4, '/').collect();
    let Some(n) = parts.get(..3).and_then(|p| TopicName::parse(&format!("persistent://{}", p.join("/"))).ok()) else {
        return next.run(req).await;
    };
    match a.ownership.resolve(&n, authoritative(uri.query())).await {
        Ok(Owner::Me) => next.run(req).await,
        Ok(Owner::Other(b)) => redirect(&b, &uri, false),
        Ok(Owner::Candidate(b)) => redirect(&b, &uri, true),
        Err(e) => fail(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Runs `method path` at the broker serving topic `n` when that is another broker
/// (`Ok(None)`: this broker serves it).
async fn at_owner(a: &Admin, n: &TopicName, method: &str, path: &str) -> Result<Option<(u16, String)>, Response> {
    let (b, auth) = match a.ownership.resolve(n, false).await {
        Ok(Owner::Me) => return Ok(None),
        Ok(Owner::Other(b)) => (b, false),
        Ok(Owner::Candidate(b)) => (b, true),
        Err(e) => return Err(fail(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    };
    let path = if auth {
        format!("{path}{}authoritative=true", if path.contains('?') { '&' } else { '?' })
    } else {
        path.into()
    };
    match crate::http::request_following(&b.http_url, method, &path, "").await {
        Ok(r) => Ok(Some((r.status, r.body))),
        Err(e) => Err(fail(StatusCode::SERVICE_UNAVAILABLE, format!("{n} is served by {}: {e}", b.broker_id))),
    }
}

/// The admin path of topic `n` (`/admin/v2/persistent/t/ns/x`).
fn admin_path(n: &TopicName) -> String {
    format!("/admin/v2/persistent/{}/{}/{}", n.tenant, n.namespace, n.local)
}

fn partition_count(body: &Bytes) -> Result<u32, Response> {
    let text = String::from_utf8_lossy(body);
    match text.trim().parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(fail(StatusCode::PRECONDITION_FAILED, "the number of partitions must be a positive integer")),
    }
}

async fn partitions_create(State(a): S, Path((t, ns, topic)): Path<(String, String, String)>, body: Bytes) -> Response {
    if let Some(r) = check_namespace(&a, &t, &ns).await {
        return r;
    }
    let (n, count) = match (name(&t, &ns, &topic), partition_count(&body)) {
        (Ok(n), Ok(c)) => (n, c),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    match exists(&a.meta, &topic_key(&n)).await {
        Ok(true) => return fail(StatusCode::CONFLICT, format!("Topic {n} already exists as a non-partitioned topic")),
        Ok(false) => {}
        Err(e) => return meta_error(e),
    }
    let body = serde_json::to_vec(&PartitionedMetadata { partitions: count }).unwrap_or_default();
    create(&a.meta, &partitioned_key(&n), body, &format!("Partitioned topic {n}")).await
}

async fn partitions_update(State(a): S, Path((t, ns, topic)): Path<(String, String, String)>, body: Bytes) -> Response {
    let (n, count) = match (name(&t, &ns, &topic), partition_count(&body)) {
        (Ok(n), Ok(c)) => (n, c),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let key = partitioned_key(&n);
    let kv = match a.meta.get(&key).await {
        Ok(Some(kv)) => kv,
        Ok(None) => return fail(StatusCode::NOT_FOUND, format!("Partitioned topic {n} does not exist")),
        Err(e) => return meta_error(e),
    };
    let old: PartitionedMetadata = serde_json::from_slice(&kv.value).unwrap_or(PartitionedMetadata { partitions: 0 });
    if count <= old.partitions {
        return fail(
            StatusCode::CONFLICT,
            format!("the number of partitions can only grow: {} now, {count} asked", old.partitions),
        );
    }
    let body = serde_json::to_vec(&PartitionedMetadata { partitions: count }).unwrap_or_default();
    match a.meta.put(&key, body, PutOptions { expected_version: Some(kv.version), session: 0 }).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(ClientError::BadVersion { .. }) => {
            fail(StatusCode::CONFLICT, format!("Topic {n} was changed concurrently"))
        }
        Err(e) => meta_error(e),
    }
}

async fn partitions_get(State(a): S, Path((t, ns, topic)): Path<(String, String, String)>) -> Response {
    let n = match name(&t, &ns, &topic) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match a.topics.partitions(&n).await {
        Ok(p) => json(StatusCode::OK, &serde_json::json!({ "partitions": p })),
        Err(e) => topic_error(e),
    }
}

async fn topic_stats(a: &Admin, n: &TopicName) -> Result<crate::topic::stats::TopicStats, Response> {
    let topic = existing(a, n).await?;
    topic.ask(|done| Cmd::Stats { done }).await.map_err(topic_error)
}

async fn stats(State(a): S, Path((t, ns, topic)): Path<(String, String, String)>) -> Response {
    let n = match name(&t, &ns, &topic) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match topic_stats(&a, &n).await {
        Ok(s) => json(StatusCode::OK, &s),
        Err(r) => r,
    }
}

async fn partitioned_stats(State(a): S, Path((t, ns, topic)): Path<(String, String, String)>) -> Response {
    let n = match name(&t, &ns, &topic) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let count = match a.topics.partitions(&n).await {
        Ok(0) => return fail(StatusCode::NOT_FOUND, format!("Partitioned topic {n} does not exist")),
        Ok(c) => c,
        Err(e) => return topic_error(e),
    };
    let mut total = crate::topic::stats::TopicStats::default();
    let mut partitions = serde_json::Map::new();
    for i in 0..count {
        let p = n.partition_name(i);
        // A partition nobody used yet has no ledger: it counts as empty.
        let s = match at_owner(&a, &p, "GET", &format!("{}/stats", admin_path(&p))).await {
            Ok(Some((200, body))) => serde_json::from_str(&body).unwrap_or_default(),
            Ok(Some(_)) => Default::default(),
            Ok(None) => topic_stats(&a, &p).await.unwrap_or_default(),
            Err(r) => return r,
        };
        total.msg_rate_in += s.msg_rate_in;
        total.msg_throughput_in += s.msg_throughput_in;
        total.msg_rate_out += s.msg_rate_out;
        total.msg_throughput_out += s.msg_throughput_out;
        total.msg_in_counter += s.msg_in_counter;
        total.bytes_in_counter += s.bytes_in_counter;
        total.msg_out_counter += s.msg_out_counter;
        total.storage_size += s.storage_size;
        total.entries += s.entries;
        total.backlog_size += s.backlog_size;
        total.publishers.extend(s.publishers.iter().cloned());
        for (name, sub) in &s.subscriptions {
            let e = total.subscriptions.entry(name.clone()).or_default();
            e.msg_backlog += sub.msg_backlog;
            e.backlog_size += sub.backlog_size;
            e.unacked_messages += sub.unacked_messages;
            e.msg_out_counter += sub.msg_out_counter;
            e.msg_rate_out += sub.msg_rate_out;
            e.msg_throughput_out += sub.msg_throughput_out;
            e.sub_type = sub.sub_type.clone();
            e.is_durable = sub.is_durable;
            e.consumers.extend(sub.consumers.iter().cloned());
        }
        partitions.insert(p.to_string(), serde_json::to_value(&s).unwrap_or(Value::Null));
    }
    let mut v = serde_json::to_value(&total).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert("metadata".into(), serde_json::json!({ "partitions": count }));
        o.insert("partitions".into(), Value::Object(partitions));
    }
    json(StatusCode::OK, &v)
}

/// Prometheus text: per-topic and per-subscription series with Pulsar's names and labels.
async fn metrics(State(a): S) -> Response {
    let mut out = String::new();
    let created = a.connections.created.load(std::sync::atomic::Ordering::Relaxed);
    let closed = a.connections.closed.load(std::sync::atomic::Ordering::Relaxed);
    let cluster = &a.cluster;
    out.push_str(&format!(
        "# HELP pulsar_active_connections Client connections open\n# TYPE pulsar_active_connections gauge\n\
         pulsar_active_connections{{cluster=\"{cluster}\"}} {}\n\
         # HELP pulsar_connection_created_total_count Client connections opened\n\
         # TYPE pulsar_connection_created_total_count counter\n\
         pulsar_connection_created_total_count{{cluster=\"{cluster}\"}} {created}\n\
         # HELP pulsar_connection_closed_total_count Client connections closed\n\
         # TYPE pulsar_connection_closed_total_count counter\n\
         pulsar_connection_closed_total_count{{cluster=\"{cluster}\"}} {closed}\n",
        created.saturating_sub(closed)
    ));
    let t = a.connections.publish.gauges();
    out.push_str(&format!(
        "# HELP pulsar_broker_throttled_connections Connections not read now: too many of their sends, or of all \
         sends, wait for their appends\n# TYPE pulsar_broker_throttled_connections gauge\n\
         pulsar_broker_throttled_connections{{cluster=\"{cluster}\"}} {}\n\
         # HELP pulsar_broker_throttled_connections_global_limit Connections not read now because of \
         max_message_publish_buffer_size_in_mb\n\
         # TYPE pulsar_broker_throttled_connections_global_limit gauge\n\
         pulsar_broker_throttled_connections_global_limit{{cluster=\"{cluster}\"}} {}\n\
         # HELP magnetar_broker_publish_pending Sends waiting for their appends\n\
         # TYPE magnetar_broker_publish_pending gauge\n\
         magnetar_broker_publish_pending{{cluster=\"{cluster}\"}} {}\n\
         # HELP magnetar_broker_publish_buffer_bytes Bytes of the sends waiting for their appends\n\
         # TYPE magnetar_broker_publish_buffer_bytes gauge\n\
         magnetar_broker_publish_buffer_bytes{{cluster=\"{cluster}\"}} {}\n",
        t.throttled, t.throttled_global, t.pending, t.buffer_bytes
    ));
    let loaded = a.topics.loaded().await;
    // Series are per topic, or per namespace when topic-level series are turned off.
    let mut rows: Vec<(String, crate::topic::stats::TopicStats)> = Vec::new();
    for t in loaded {
        let Ok(s) = t.ask(|done| Cmd::Stats { done }).await else { continue };
        let n = &t.name;
        if a.topic_level_metrics {
            rows.push((
                format!("cluster=\"{}\",namespace=\"{}/{}\",topic=\"{}\"", a.cluster, n.tenant, n.namespace, n),
                s,
            ));
            continue;
        }
        let label = format!("cluster=\"{}\",namespace=\"{}/{}\"", a.cluster, n.tenant, n.namespace);
        match rows.iter_mut().find(|(l, _)| *l == label) {
            Some((_, agg)) => merge(agg, &s),
            None => {
                let mut agg = crate::topic::stats::TopicStats::default();
                merge(&mut agg, &s);
                rows.push((label, agg));
            }
        }
    }
    type TopicSeries = (&'static str, &'static str, fn(&crate::topic::stats::TopicStats) -> f64);
    type SubSeries = (&'static str, &'static str, fn(&crate::topic::stats::SubscriptionStats) -> f64);
    let topic_series: [TopicSeries; 9] = [
        ("pulsar_rate_in", "Messages per second published", |s| s.msg_rate_in),
        ("pulsar_rate_out", "Messages per second delivered", |s| s.msg_rate_out),
        ("pulsar_throughput_in", "Bytes per second published", |s| s.msg_throughput_in),
        ("pulsar_throughput_out", "Bytes per second delivered", |s| s.msg_throughput_out),
        ("pulsar_storage_size", "Bytes stored in the topic's ledgers", |s| s.storage_size as f64),
        ("pulsar_msg_backlog", "Entries not acknowledged, summed over subscriptions", |s| {
            s.subscriptions.values().map(|x| x.msg_backlog).sum::<u64>() as f64
        }),
        ("pulsar_producers_count", "Connected producers", |s| s.publishers.len() as f64),
        ("pulsar_consumers_count", "Connected consumers", |s| {
            s.subscriptions.values().map(|x| x.consumers.len()).sum::<usize>() as f64
        }),
        ("pulsar_subscriptions_count", "Subscriptions", |s| s.subscriptions.len() as f64),
    ];
    let labels = |l: &String| l.clone();
    for (metric, help, f) in topic_series {
        out.push_str(&format!("# HELP {metric} {help}\n# TYPE {metric} gauge\n"));
        for (n, s) in &rows {
            out.push_str(&format!("{metric}{{{}}} {}\n", labels(n), f(s)));
        }
    }
    out.push_str("# HELP pulsar_in_messages_total Messages published since the topic was loaded\n# TYPE pulsar_in_messages_total counter\n");
    for (n, s) in &rows {
        out.push_str(&format!("pulsar_in_messages_total{{{}}} {}\n", labels(n), s.msg_in_counter));
    }
    let sub_series: [SubSeries; 4] = [
        ("pulsar_subscription_back_log", "Entries not acknowledged", |s| s.msg_backlog as f64),
        ("pulsar_subscription_unacked_messages", "Delivered and not acknowledged", |s| s.unacked_messages as f64),
        ("pulsar_subscription_msg_rate_out", "Messages per second delivered", |s| s.msg_rate_out),
        ("pulsar_subscription_msg_throughput_out", "Bytes per second delivered", |s| s.msg_throughput_out),
    ];
    for (metric, help, f) in sub_series.iter().filter(|_| a.topic_level_metrics) {
        out.push_str(&format!("# HELP {metric} {help}\n# TYPE {metric} gauge\n"));
        for (n, s) in &rows {
            for (sub, st) in &s.subscriptions {
                out.push_str(&format!("{metric}{{{},subscription=\"{sub}\"}} {}\n", labels(n), f(st)));
            }
        }
    }
    // Publish latency buckets (cumulative since each topic was loaded).
    let bucket_names = ["0_5", "1", "5", "10", "20", "50", "100", "200", "1000", "overflow"];
    for (i, b) in bucket_names.iter().enumerate() {
        let metric = format!("pulsar_storage_write_latency_le_{b}");
        out.push_str(&format!(
            "# HELP {metric} Entry writes that took at most {b} ms (overflow: longer)\n# TYPE {metric} gauge\n"
        ));
        for (n, s) in &rows {
            out.push_str(&format!("{metric}{{{}}} {}\n", labels(n), s.write_latency.buckets[i]));
        }
    }
    out.push_str("# TYPE pulsar_storage_write_latency_count gauge\n");
    for (n, s) in &rows {
        out.push_str(&format!("pulsar_storage_write_latency_count{{{}}} {}\n", labels(n), s.write_latency.count));
    }
    out.push_str("# TYPE pulsar_storage_write_latency_sum gauge\n");
    for (n, s) in &rows {
        out.push_str(&format!("pulsar_storage_write_latency_sum{{{}}} {}\n", labels(n), s.write_latency.sum_ms));
    }
    out.push_str(&format!("# HELP pulsar_topics_count Loaded topics\n# TYPE pulsar_topics_count gauge\npulsar_topics_count{{cluster=\"{}\"}} {}\n", a.cluster, rows.len()));
    out.push_str(&format!(
        "# HELP magnetar_orphan_ledgers_deleted_total Ledgers no topic listed, deleted by this broker's periodic look\n\
         # TYPE magnetar_orphan_ledgers_deleted_total counter\nmagnetar_orphan_ledgers_deleted_total{{cluster=\"{}\"}} {}\n",
        a.cluster,
        a.topics.orphans_deleted()
    ));
    let cache = &a.topics.settings().cache;
    out.push_str(&format!(
        "# HELP pulsar_ml_cache_used_size Bytes held by the topics' tail caches\n\
         # TYPE pulsar_ml_cache_used_size gauge\npulsar_ml_cache_used_size{{cluster=\"{cluster}\"}} {}\n\
         # HELP magnetar_ml_cache_size_limit The tail caches' budget (managed_ledger_cache_size_mb), bytes\n\
         # TYPE magnetar_ml_cache_size_limit gauge\nmagnetar_ml_cache_size_limit{{cluster=\"{cluster}\"}} {}\n\
         # HELP magnetar_ml_cache_evicted_total Entries that left a tail cache to keep the caches within their budget\n\
         # TYPE magnetar_ml_cache_evicted_total counter\nmagnetar_ml_cache_evicted_total{{cluster=\"{cluster}\"}} {}\n",
        cache.used(),
        cache.limit(),
        cache.evicted(),
    ));
    out.push_str(&magnetar_common::metrics::process_text());
    ([(header::CONTENT_TYPE, magnetar_common::metrics::TEXT_CONTENT_TYPE)], out).into_response()
}

/// Adds `s` into a namespace-level aggregate (subscriptions are kept under distinct keys so
/// their backlogs and consumers add up; subscription series are not exported there).
fn merge(agg: &mut crate::topic::stats::TopicStats, s: &crate::topic::stats::TopicStats) {
    agg.msg_rate_in += s.msg_rate_in;
    agg.msg_throughput_in += s.msg_throughput_in;
    agg.msg_rate_out += s.msg_rate_out;
    agg.msg_throughput_out += s.msg_throughput_out;
    agg.msg_in_counter += s.msg_in_counter;
    agg.storage_size += s.storage_size;
    agg.publishers.extend(s.publishers.iter().cloned());
    for (name, sub) in &s.subscriptions {
        let key = format!("{}#{name}", agg.subscriptions.len());
        agg.subscriptions.insert(key, sub.clone());
    }
    for i in 0..10 {
        agg.write_latency.buckets[i] += s.write_latency.buckets[i];
    }
    agg.write_latency.sum_ms += s.write_latency.sum_ms;
    agg.write_latency.count += s.write_latency.count;
}

/// Serves on `listener` until `cancel`.
pub(crate) fn serve(listener: tokio::net::TcpListener, admin: Admin, cancel: CancellationToken, tasks: &TaskTracker) {
    let admin = Arc::new(admin);
    let topic = "/admin/v2/persistent/{tenant}/{namespace}/{topic}";
    // Served by the topic's owner.
    let owned = Router::new()
        .route(topic, axum::routing::put(topic_create).delete(topic_delete))
        .route(&format!("{topic}/stats"), get(stats))
        .route(&format!("{topic}/internalStats"), get(internal_stats))
        .route(&format!("{topic}/lastMessageId"), get(last_message_id))
        .route(&format!("{topic}/unload"), axum::routing::put(unload))
        .route(&format!("{topic}/terminate"), axum::routing::post(terminate))
        .route(&format!("{topic}/subscriptions"), get(subscriptions))
        .route(&format!("{topic}/subscription/{{subscription}}"), axum::routing::put(sub_create).delete(sub_delete))
        .route(&format!("{topic}/subscription/{{subscription}}/skip/{{n}}"), axum::routing::post(sub_skip))
        .route(&format!("{topic}/subscription/{{subscription}}/skip_all"), axum::routing::post(sub_skip_all))
        .route(
            &format!("{topic}/subscription/{{subscription}}/expireMessages/{{seconds}}"),
            axum::routing::post(sub_expire),
        )
        .route(
            &format!("{topic}/subscription/{{subscription}}/resetcursor/{{timestamp}}"),
            axum::routing::post(sub_reset),
        )
        .route(&format!("{topic}/subscription/{{subscription}}/position/{{n}}"), get(sub_peek))
        .route_layer(axum::middleware::from_fn_with_state(admin.clone(), to_owner));
    let app = Router::new()
        .route("/status.html", get(status))
        .route("/metrics", get(metrics))
        .route("/admin/v2/brokers/health", get(health))
        .route(&format!("{topic}/messageTTL"), get(topic_ttl_get).post(topic_ttl_set).delete(topic_ttl_delete))
        .route(
            &format!("{topic}/deduplicationEnabled"),
            get(topic_dedup_get).post(topic_dedup_set).delete(topic_dedup_delete),
        )
        .route("/admin/v2/schemas/{tenant}/{namespace}/{topic}/schema", get(schema_get).delete(schema_delete))
        .route("/admin/v2/schemas/{tenant}/{namespace}/{topic}/schema/{version}", get(schema_get_version))
        .route("/admin/v2/brokers/{cluster}", get(brokers))
        .route("/admin/v2/clusters", get(clusters))
        .route(
            "/admin/v2/clusters/{cluster}",
            get(cluster).put(cluster_create).post(cluster_update).delete(cluster_delete),
        )
        .route("/admin/v2/tenants", get(tenants))
        .route(
            "/admin/v2/tenants/{tenant}",
            get(tenant_get).put(tenant_create).post(tenant_update).delete(tenant_delete),
        )
        .route("/admin/v2/namespaces/{tenant}", get(namespaces))
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}",
            get(namespace_get).put(namespace_create).delete(namespace_delete),
        )
        .route("/admin/v2/namespaces/{tenant}/{namespace}/permissions", get(permissions_get))
        .route("/admin/v2/namespaces/{tenant}/{namespace}/permissions/{role}", axum::routing::post(permission_grant))
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/{policy}",
            get(policy_get).post(policy_set).delete(policy_delete),
        )
        .route("/admin/v2/persistent/{tenant}/{namespace}", get(topics_list))
        .route("/admin/v2/persistent/{tenant}/{namespace}/partitioned", get(partitioned_list))
        .route(
            &format!("{topic}/partitions"),
            get(partitions_get).put(partitions_create).post(partitions_update).delete(partitions_delete),
        )
        .route("/lookup/v2/topic/persistent/{tenant}/{namespace}/{topic}", get(lookup))
        .route(&format!("{topic}/partitioned-stats"), get(partitioned_stats))
        .merge(owned)
        .with_state(admin);
    tasks.spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await {
            tracing::error!(error = %e, "broker HTTP server failed");
        }
    });
}
