//! Turning a sink URL into an object store and a root path inside it.
//!
//! Supported forms:
//! - a plain local path or `file:///abs/dir`: a [`LocalFileSystem`] rooted at that directory
//!   (created if missing);
//! - `memory://<name>/<prefix>`: a process-wide [`InMemory`] store registered under `<name>`, so
//!   a writer and a later reader of the same URL in one process see the same objects (tests);
//! - `s3://<bucket>/<prefix>`: [`AmazonS3Builder::from_env`] with the bucket, honouring
//!   `AWS_ENDPOINT_URL_S3` (then `AWS_ENDPOINT_URL`) and `AWS_ALLOW_HTTP`; explicit options
//!   (`AmazonS3ConfigKey` names such as `aws_endpoint`, `aws_allow_http`) override the environment.
//!
//! This is private to the crate; once `sluice_blockstore::object_store_from_url` lands it should
//! replace this module.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;

use crate::{Error, Result};

/// Named in-memory stores shared by every `memory://<name>` URL in this process.
fn memory_stores() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    STORES.get_or_init(|| Mutex::new(HashMap::new()))
}

fn invalid(url: &str, reason: impl Into<String>) -> Error {
    Error::InvalidLocation {
        url: url.to_owned(),
        reason: reason.into(),
    }
}

/// Splits `authority/rest` into the authority and a root [`Path`].
fn split_authority(rest: &str) -> (&str, Path) {
    let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    (authority, Path::from(prefix.trim_matches('/')))
}

/// Resolves `url` into a store and the root path of the sink inside it.
pub(crate) fn resolve(url: &str, options: &[(String, String)]) -> Result<(Arc<dyn ObjectStore>, Path)> {
    if let Some(rest) = url.strip_prefix("memory://") {
        let (name, root) = split_authority(rest);
        let store = Arc::clone(
            memory_stores()
                .lock()
                .expect("memory store registry poisoned")
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(InMemory::new())),
        );
        return Ok((store, root));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, root) = split_authority(rest);
        if bucket.is_empty() {
            return Err(invalid(url, "missing bucket; expected s3://<bucket>/<prefix>"));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
        {
            builder = builder.with_endpoint(endpoint);
        }
        if let Ok(allow) = std::env::var("AWS_ALLOW_HTTP") {
            builder = builder.with_allow_http(matches!(allow.to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
        }
        for (key, value) in options {
            let key = AmazonS3ConfigKey::from_str(key)
                .map_err(|e| invalid(url, format!("unknown S3 option {key:?}: {e}")))?;
            builder = builder.with_config(key, value);
        }
        let store = builder.build().map_err(|source| Error::ObjectStore {
            location: url.to_owned(),
            source,
        })?;
        return Ok((Arc::new(store), root));
    }
    let dir = match url.strip_prefix("file://") {
        Some(path) => path,
        None if url.contains("://") => {
            return Err(invalid(
                url,
                "unsupported scheme; use a local path, file://, memory:// or s3://",
            ));
        }
        None => url,
    };
    if dir.is_empty() {
        return Err(invalid(url, "empty directory path"));
    }
    std::fs::create_dir_all(dir).map_err(|e| invalid(url, format!("cannot create directory: {e}")))?;
    let store = LocalFileSystem::new_with_prefix(dir).map_err(|source| Error::ObjectStore {
        location: url.to_owned(),
        source,
    })?;
    Ok((Arc::new(store), Path::default()))
}
