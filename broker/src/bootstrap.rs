//! The metadata a cluster starts with (what `pulsar initialize-cluster-metadata` creates):
//! the cluster, tenant `public` and namespace `public/default`. Created once; existing
//! entries are left as they are.

use magnetar_metastore::client::{ClientError, MetaClient, PutOptions};
use serde_json::json;

/// Creates what is missing of cluster `cluster`, tenant `public` and namespace
/// `public/default`.
pub async fn initial_metadata(meta: &MetaClient, cluster: &str, service_url: &str) -> Result<(), ClientError> {
    let entries = [
        (format!("/cluster/{cluster}"), json!({ "serviceUrl": "", "brokerServiceUrl": service_url })),
        ("/tenants/public".to_string(), json!({ "adminRoles": [], "allowedClusters": [cluster] })),
        (
            "/namespaces/public/default".to_string(),
            json!({ "replication_clusters": [cluster], "bundles": { "numBundles": 4 } }),
        ),
    ];
    for (key, value) in entries {
        let body = serde_json::to_vec(&value).unwrap_or_default();
        match meta.put(&key, body, PutOptions { expected_version: Some(0), session: 0 }).await {
            Ok(_) | Err(ClientError::BadVersion { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
