//! Safe retries of inspections: the `Idempotency-Key` header (after the IETF draft of
//! that name). A request whose key is recorded for its model is answered from that
//! record; one whose key is still being judged here waits for it; across replicas, a
//! unique index on (model, key) keeps one record and the others answer with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;

/// Longest key (a UUID is 36 characters).
pub const MAX_KEY: usize = 255;

/// The key a request names. A structured-field string in the draft, so quotes around it
/// are allowed and not part of the key; escapes inside are not taken.
pub fn key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::BadRequest(
            "send one Idempotency-Key header, not several".into(),
        ));
    }
    let bytes = value.as_bytes();
    let key = match bytes {
        [b'"', inner @ .., b'"'] => inner,
        _ => bytes,
    };
    let printable = |b: &u8| (0x20..0x7f).contains(b) && *b != b'"' && *b != b'\\';
    if key.is_empty() || key.len() > MAX_KEY || !key.iter().all(printable) {
        return Err(ApiError::BadRequest(format!(
            "Idempotency-Key must be 1 to {MAX_KEY} printable ASCII characters, without quotes or \
             backslashes inside, e.g. a UUID"
        )));
    }
    Ok(Some(String::from_utf8_lossy(key).into_owned()))
}

/// What a retry must share with the request that first used its key (the model is part of
/// the key's scope): the image, the part and the overrides. Another request under a used
/// key is refused rather than answered with a verdict about something else.
pub fn fingerprint(image_sha256: &str, part_id: Option<&str>, threshold: Option<f32>, alpha: Option<f32>) -> String {
    let canonical = serde_json::json!([image_sha256, part_id, threshold, alpha]).to_string();
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// The answer recorded for `key` of `model`, again, if the request matches the one that
/// first used it; None when nothing is recorded under the key.
pub async fn replay(state: &AppState, model: &str, key: &str, fingerprint: &str) -> Result<Option<Response>, ApiError> {
    let Some(record) = state.store.by_idempotency_key(model, key).await? else {
        return Ok(None);
    };
    if record.request_fingerprint.as_deref() != Some(fingerprint) {
        return Err(ApiError::IdempotencyKeyReused(format!(
            "Idempotency-Key {key:?} was sent to model {model:?} before with another image, part id or \
             query (inspection {}): use a new key for a new request",
            record.id
        )));
    }
    metrics::counter!(crate::metrics::REPLAYS, "model" => model.to_string()).increment(1);
    let feedback = state
        .store
        .labels_of(std::slice::from_ref(&record.id))
        .await?
        .remove(&record.id);
    let mut resp = Json(super::records::to_response(record, feedback)).into_response();
    resp.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(Some(resp))
}

/// The keys this server is judging: a retry that arrives while its first request is still
/// being judged waits for it and is answered from its record, instead of running the model
/// a second time (retries come when the server is slow, so they would slow it further).
#[derive(Default, Clone)]
pub struct KeysInFlight {
    keys: Arc<std::sync::Mutex<HashMap<Scope, Arc<tokio::sync::Mutex<()>>>>>,
}

/// A key within its model: (model, key).
type Scope = (String, String);

/// Held while a request with a key is looked up, judged and recorded; owned, so that the
/// task writing the record holds it until the row is committed even if the client has
/// gone (a retry then finds the record instead of judging again).
pub struct InFlight {
    keys: KeysInFlight,
    scope: Scope,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeysInFlight {
    /// Waits (at most `limit`: 503 `timeout` after) until no other request of this server
    /// holds `key` of `model`, then holds it.
    pub async fn hold(&self, model: &str, key: &str, limit: Duration) -> Result<InFlight, ApiError> {
        let scope = (model.to_string(), key.to_string());
        let lock = self
            .keys
            .lock()
            .expect("keys lock")
            .entry(scope.clone())
            .or_default()
            .clone();
        // Built before the wait, so that a wait given up (timeout, client gone) cleans up too.
        let mut held = InFlight {
            keys: self.clone(),
            scope,
            guard: None,
        };
        held.guard = Some(
            tokio::time::timeout(limit, lock.lock_owned())
                .await
                .map_err(|_| ApiError::Timeout)?,
        );
        Ok(held)
    }

    /// Keys held or waited for (0 when every request is done: none is leaked).
    pub fn len(&self) -> usize {
        self.keys.lock().expect("keys lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut keys = self.keys.keys.lock().expect("keys lock");
        // Only the map's own reference left: nobody holds or waits for the key.
        if keys.get(&self.scope).is_some_and(|lock| Arc::strong_count(lock) == 1) {
            keys.remove(&self.scope);
        }
    }
}
