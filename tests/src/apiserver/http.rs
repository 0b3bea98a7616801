//! Requests: paths to resources, the verbs, lists with pagination, and errors as Status.

use std::{collections::HashMap, sync::Arc};

use axum::{
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

use super::{
    RESOURCES, RequestRecord, Shared,
    selector::Filter,
    store::{Snapshot, Store},
    watches::start_watch,
};

/// A metav1 Status, the body of every error the API server returns.
#[derive(Debug)]
pub(super) struct Status {
    code: u16,
    reason: &'static str,
    message: String,
}

impl Status {
    pub(super) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn not_found(plural: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{plural} \"{name}\" not found"))
    }

    pub(super) fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

impl IntoResponse for Status {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.to_json())
    }
}

pub(super) fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// What a request's path names: a collection, or one object in it.
pub(super) struct Target {
    pub(super) resource: usize,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    /// `status` for a resource's status subresource.
    pub(super) subresource: Option<&'static str>,
}

pub(super) fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
            (Some((*namespace).to_owned()), rest)
        }
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some((*name).to_owned()), None),
        [plural, name, "status"] => (*plural, Some((*name).to_owned()), Some("status")),
        _ => return None,
    };
    let resource = RESOURCES
        .iter()
        .position(|r| r.api_version == api_version && r.plural == plural)?;
    if subresource.is_some() && !RESOURCES[resource].status {
        return None;
    }
    let namespaced = RESOURCES[resource].namespaced;
    if (!namespaced && namespace.is_some()) || (namespaced && namespace.is_none() && name.is_some())
    {
        return None;
    }
    Some(Target {
        resource,
        namespace,
        name,
        subresource,
    })
}

pub(super) async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let response = route(&shared, &method, &uri, &headers, &body)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    shared.log.lock().expect("log lock").push(RequestRecord {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        status: response.status().as_u16(),
        user: headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_owned(),
        at: std::time::Instant::now(),
    });
    response
}

async fn route(
    shared: &Arc<Shared>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, Status> {
    if uri.path() == "/version" {
        let version = json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-lbagent-test"});
        return Ok(json_response(StatusCode::OK, &version));
    }
    let Some(target) = parse_path(uri.path()) else {
        return Err(Status::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    let Query(params) = Query::<HashMap<String, String>>::try_from_uri(uri)
        .map_err(|err| Status::bad_request(format!("query: {err}")))?;
    let spec = &RESOURCES[target.resource];
    let namespace = target.namespace.clone().unwrap_or_default();
    match (method.clone(), target.name) {
        (Method::GET, None) => {
            let filter = Filter::new(target.resource, target.namespace, &params)?;
            if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
                start_watch(shared, filter, &params)
            } else {
                list(&mut shared.store(), filter, &params)
            }
        }
        (Method::GET, Some(name)) => {
            let key = (target.resource, namespace, name);
            match shared.store().objects.get(&key) {
                Some(stored) => Ok(json_response(StatusCode::OK, &stored.object)),
                None => Err(Status::not_found(spec.plural, &key.2)),
            }
        }
        (Method::POST, None) if target.subresource.is_none() => {
            let mut object = parse_body(body, &namespace)?;
            if let Some(fields) = object.as_object_mut() {
                if spec.status {
                    fields.remove("status");
                }
                // The server sets it, whatever the client sends.
                if let Some(Value::Object(metadata)) = fields.get_mut("metadata") {
                    metadata.remove("creationTimestamp");
                }
            }
            let created = shared.mutate(|store| {
                let name = object_name(&object, store.revision + 1)?;
                let key = (target.resource, namespace, name);
                if store.objects.contains_key(&key) {
                    return Err(Status::new(
                        409,
                        "AlreadyExists",
                        format!("{} \"{}\" already exists", spec.plural, key.2),
                    ));
                }
                store.put(key, object, None)
            })?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (Method::PUT, Some(name)) => {
            let object = parse_body(body, &namespace)?;
            let expected = object["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_owned);
            let key = (target.resource, namespace, name);
            let replaced = shared.mutate(|store| {
                store.interleave_write(&key)?;
                let Some(stored) = store.objects.get(&key) else {
                    return Err(Status::not_found(spec.plural, &key.2));
                };
                let object = split_status(spec.status, target.subresource, &stored.object, object);
                store.put(key, object, expected.as_deref())
            })?;
            Ok(json_response(StatusCode::OK, &replaced))
        }
        (Method::PATCH, Some(name)) => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if content_type != "application/merge-patch+json" {
                return Err(Status::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the test API server applies merge patches only, not {content_type:?}"),
                ));
            }
            let patch: Value = serde_json::from_slice(body)
                .map_err(|err| Status::bad_request(format!("patch body: {err}")))?;
            let expected = patch["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_owned);
            let key = (target.resource, namespace, name);
            let patched = shared.mutate(|store| {
                store.interleave_write(&key)?;
                let Some(stored) = store.objects.get(&key) else {
                    return Err(Status::not_found(spec.plural, &key.2));
                };
                let mut object = stored.object.clone();
                match (spec.status, target.subresource) {
                    // A status write changes the status alone: only that part of the patch
                    // applies (one copy of the stored object, not two).
                    (true, Some(_)) => {
                        if let Some(status) = patch.get("status") {
                            merge_patch(&mut object, &json!({"status": status}));
                        }
                    }
                    _ => {
                        merge_patch(&mut object, &patch);
                        object =
                            split_status(spec.status, target.subresource, &stored.object, object);
                    }
                }
                store.put(key, object, expected.as_deref())
            })?;
            Ok(json_response(StatusCode::OK, &patched))
        }
        (Method::DELETE, Some(name)) if target.subresource.is_none() => {
            let key = (target.resource, namespace, name);
            match shared.mutate(|store| store.remove(&key)) {
                Some(object) => Ok(json_response(StatusCode::OK, &object)),
                None => Err(Status::not_found(spec.plural, &key.2)),
            }
        }
        _ => Err(Status::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {}", uri.path()),
        )),
    }
}

/// What a write to an object (`subresource` None) or to its status leaves stored, for a
/// resource whose status is a subresource: the one takes all but the status from `written`,
/// the other only the status.
fn split_status(
    has_status: bool,
    subresource: Option<&str>,
    stored: &Value,
    written: Value,
) -> Value {
    if !has_status {
        return written;
    }
    let (mut kept, from) = match subresource {
        None => (written, stored),
        Some(_) => (stored.clone(), &written),
    };
    match from.get("status") {
        Some(status) => kept["status"] = status.clone(),
        None => {
            if let Some(fields) = kept.as_object_mut() {
                fields.remove("status");
            }
        }
    }
    kept
}

/// A create or replace body: a JSON object whose namespace, if any, is the request's.
fn parse_body(body: &[u8], namespace: &str) -> Result<Value, Status> {
    let object: Value = serde_json::from_slice(body)
        .map_err(|err| Status::bad_request(format!("request body: {err}")))?;
    if !object.is_object() {
        return Err(Status::bad_request("the request body is not a JSON object"));
    }
    match object["metadata"]["namespace"].as_str() {
        Some(ns) if !ns.is_empty() && ns != namespace => Err(Status::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => Ok(object),
    }
}

/// The name a created object gets: its own, or its generateName with a unique suffix.
fn object_name(object: &Value, revision: u64) -> Result<String, Status> {
    let metadata = &object["metadata"];
    match (metadata["name"].as_str(), metadata["generateName"].as_str()) {
        (Some(name), _) if !name.is_empty() => Ok(name.to_owned()),
        (_, Some(prefix)) if !prefix.is_empty() => Ok(format!("{prefix}{revision:05x}")),
        _ => Err(Status::new(
            422,
            "Invalid",
            "metadata.name: Required value: name or generateName is required",
        )),
    }
}

/// RFC 7386 JSON merge patch (tests build objects with it too).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(fields) = target {
        for (key, value) in patch {
            if value.is_null() {
                fields.remove(key);
            } else {
                merge_patch(fields.entry(key.as_str()).or_insert(Value::Null), value);
            }
        }
    }
}

fn list(
    store: &mut Store,
    filter: Filter,
    params: &HashMap<String, String>,
) -> Result<Response, Status> {
    let limit = match params.get("limit") {
        Some(limit) => limit
            .parse::<usize>()
            .map_err(|_| Status::bad_request(format!("limit: not a number: {limit:?}")))?,
        None => 0,
    };
    let (id, offset) = match params.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => parse_continue(token)?,
        None => {
            check_list_version(store, params)?;
            let id = store.next_snapshot;
            store.next_snapshot += 1;
            let snapshot = Snapshot {
                revision: store.revision,
                items: store.matching(&filter),
                pages_served: 0,
                fail_after_pages: None,
            };
            store.snapshots.insert(id, snapshot);
            (id, 0)
        }
    };
    let Some(snapshot) = store.snapshots.get_mut(&id) else {
        return Err(Status::expired(
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter.",
        ));
    };
    let end = if limit == 0 {
        snapshot.items.len()
    } else {
        (offset + limit).min(snapshot.items.len())
    };
    if snapshot.pages_served == 0 && end < snapshot.items.len() {
        snapshot.fail_after_pages = store.fail_list_after_pages.take();
    }
    if snapshot.fail_after_pages == Some(snapshot.pages_served) {
        snapshot.fail_after_pages = None;
        return Err(Status::new(500, "InternalError", "injected list failure"));
    }
    snapshot.pages_served += 1;
    let items = snapshot.items.get(offset..end).unwrap_or_default().to_vec();
    let remaining = snapshot.items.len().saturating_sub(end);
    let mut metadata = json!({"resourceVersion": snapshot.revision.to_string()});
    if remaining > 0 {
        metadata["continue"] = format!("{id}.{end}").into();
        metadata["remainingItemCount"] = remaining.into();
    } else if offset == 0 {
        // A list that fit on one page has no continuation to serve.
        store.snapshots.remove(&id);
    }
    let spec = &RESOURCES[filter.resource];
    let body = json!({
        "kind": format!("{}List", spec.kind),
        "apiVersion": spec.api_version,
        "metadata": metadata,
        "items": items,
    });
    Ok(json_response(StatusCode::OK, &body))
}

fn parse_continue(token: &str) -> Result<(u64, usize), Status> {
    token
        .split_once('.')
        .and_then(|(id, offset)| Some((id.parse().ok()?, offset.parse().ok()?)))
        .ok_or_else(|| Status::bad_request(format!("continue key is not valid: {token:?}")))
}

/// A list can only be served at the newest version: an older Exact one is gone, a newer one
/// does not exist yet.
fn check_list_version(store: &Store, params: &HashMap<String, String>) -> Result<(), Status> {
    let Some(version) = params.get("resourceVersion").filter(|v| !v.is_empty()) else {
        return Ok(());
    };
    let version = parse_version(version)?;
    let exact = params.get("resourceVersionMatch").map(String::as_str) == Some("Exact");
    if exact && version < store.revision {
        return Err(Status::expired(format!(
            "too old resource version: {version} ({})",
            store.revision
        )));
    }
    if version > store.revision {
        return Err(Status::new(
            504,
            "Timeout",
            format!(
                "Too large resource version: {version}, current: {}",
                store.revision
            ),
        ));
    }
    Ok(())
}

pub(super) fn parse_version(version: &str) -> Result<u64, Status> {
    version
        .parse()
        .map_err(|_| Status::bad_request(format!("invalid resource version: {version:?}")))
}
