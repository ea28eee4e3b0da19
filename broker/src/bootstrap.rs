//! The metadata a standalone cluster starts with: cluster `standalone`, tenant `public`,
//! namespace `public/default` (created once; existing entries are left as they are).

use magnetar_metastore::client::{ClientError, MetaClient, PutOptions};
use serde_json::json;

/// Creates what is missing of cluster `standalone`, tenant `public` and namespace
/// `public/default`.
pub async fn standalone_metadata(meta: &MetaClient, service_url: &str) -> Result<(), ClientError> {
    let entries = [
        ("/cluster/standalone", json!({ "serviceUrl": "", "brokerServiceUrl": service_url })),
        ("/tenants/public", json!({ "adminRoles": [], "allowedClusters": ["standalone"] })),
        (
            "/namespaces/public/default",
            json!({ "replicationClusters": ["standalone"], "bundles": { "numBundles": 4 } }),
        ),
    ];
    for (key, value) in entries {
        let body = serde_json::to_vec(&value).unwrap_or_default();
        match meta.put(key, body, PutOptions { expected_version: Some(0), session: 0 }).await {
            Ok(_) | Err(ClientError::BadVersion { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
