//! The bed's vault answers like Key Vault. Two independent references, neither written by
//! us (see tests/testbed/conformance/):
//! - recorded.json: request sequences and the real service's answers, from the Azure SDKs'
//!   own test recordings; each is replayed against the bed and the answers compared by shape;
//! - spec-2025-07-01.json: the response definitions of the official REST API definition;
//!   every operation kvinject uses is called and its answer validated against them.
//!
//! How answers are compared (`shape`): values, dates and sanitized ids are not compared.
//! Objects compare by their keys; strings, integers and booleans by type; `id` and
//! `recoveryId` by their form (a secret id with a version, without one, or a deleted
//! secret's id); error `code`s literally; arrays by the set of their items' shapes.

use crate::support;
use serde_json::{Map, Value, json};
use std::{collections::BTreeSet, time::Duration};

const API_VERSION: &str = "2025-07-01";

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testbed/conformance")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn http() -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&support::testbed().ca).unwrap()).unwrap();
    reqwest::Client::builder().tls_certs_merge([ca]).build().unwrap()
}

/// A token from the bed's Entra ID endpoint, as the SDK's client-secret credential gets one.
async fn token() -> String {
    let bed = support::testbed();
    let form = "grant_type=client_credentials&client_id=kvinject-tests&client_secret=testbed-client-secret\
                &scope=https%3A%2F%2Fvault.kvinject.test%2F.default";
    let res = http()
        .post(format!("{}/testbed-tenant/oauth2/v2.0/token", bed.authority))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .expect("token endpoint");
    let body: Value = serde_json::from_slice(&res.bytes().await.unwrap()).unwrap();
    body["access_token"].as_str().expect("an access token").to_owned()
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

/// Calls the bed's vault: `path` relative to the vault (or an absolute nextLink).
async fn call(method: &str, path: &str, body: Option<&Value>, token: Option<&str>) -> Answer {
    let url = if path.starts_with("https://") {
        path.to_owned()
    } else {
        let base = support::testbed().vault_url.trim_end_matches('/').to_owned();
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{base}{path}{sep}api-version={API_VERSION}")
    };
    let mut req = http().request(method.parse().unwrap(), url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_string());
    }
    let res = req.send().await.expect("the bed's vault answers");
    let (status, headers) = (res.status().as_u16(), res.headers().clone());
    let bytes = res.bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn id_form(s: &str) -> String {
    let rest = s
        .strip_prefix("https://")
        .and_then(|r| r.split_once('/'))
        .map(|(_, p)| p);
    let parts: Vec<&str> = rest.unwrap_or_default().split('/').collect();
    let hex32 = |v: &str| v.len() == 32 && v.chars().all(|c| c.is_ascii_hexdigit());
    match parts.as_slice() {
        ["secrets", _, v] if hex32(v) => "<secret id with version>".into(),
        ["secrets", _] => "<secret id>".into(),
        ["deletedsecrets", _] => "<deleted secret id>".into(),
        _ => format!("<unexpected id {s}>"),
    }
}

/// The comparable form of an answer's body (see the module's header).
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let s = match (k.as_str(), v) {
                    ("id" | "recoveryId", Value::String(s)) => Value::String(id_form(s)),
                    ("code", Value::String(s)) => Value::String(s.clone()),
                    _ => shape(v),
                };
                out.insert(k.clone(), s);
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            let set: BTreeSet<String> = items.iter().map(|i| shape(i).to_string()).collect();
            Value::Array(
                set.into_iter()
                    .map(|s| serde_json::from_str(&s).unwrap())
                    .collect(),
            )
        }
        Value::String(_) => "string".into(),
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer".into(),
        Value::Number(_) => "number".into(),
        Value::Bool(_) => "boolean".into(),
        Value::Null => Value::Null,
    }
}

fn substitute(v: &Value, names: &[(&str, &str)]) -> Value {
    let mut text = v.to_string();
    for (placeholder, name) in names {
        text = text.replace(placeholder, name);
    }
    serde_json::from_str(&text).unwrap()
}

/// Every page of a list, its items concatenated; asserts the paging shape on the way.
async fn all_pages(path: &str, token: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut next = Some(path.to_owned());
    while let Some(link) = next {
        let a = call("GET", &link, None, Some(token)).await;
        assert_eq!(a.status, 200, "{link}: {}", a.body);
        items.extend(a.body["value"].as_array().expect("a value array").iter().cloned());
        next = match &a.body["nextLink"] {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => panic!("nextLink is neither null nor a URL: {other}"),
        };
    }
    items
}

#[tokio::test]
async fn recorded_sequences_get_the_same_answers_from_the_bed() {
    let _vault = support::VAULT.read().await;
    let token = token().await;
    let recorded = fixture("recorded.json");
    let mut transitional_answers = 0;
    for sequence in recorded["sequences"].as_array().unwrap() {
        let seq = sequence["name"].as_str().unwrap();
        let (a, b) = (support::unique("conf-a"), support::unique("conf-b"));
        let names = [("{a}", a.as_str()), ("{b}", b.as_str())];
        for (i, step) in sequence["steps"].as_array().unwrap().iter().enumerate() {
            let what = format!("{seq} step {}", i + 1);
            let method = step["method"].as_str().unwrap();
            let path = substitute(&step["path"], &names);
            let path = path.as_str().unwrap();
            let body = (!step["body"].is_null()).then(|| step["body"].clone());
            if step["pages"] == true {
                let items = all_pages(path, &token).await;
                let ours: Vec<&Value> = items
                    .iter()
                    .filter(|i| {
                        names
                            .iter()
                            .any(|(_, n)| i["id"].as_str().unwrap().ends_with(&format!("/secrets/{n}")))
                    })
                    .collect();
                let want: Vec<Value> = step["response"]["value"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(shape)
                    .collect();
                let got: Vec<Value> = ours.iter().map(|i| shape(i)).collect();
                assert_eq!(got, want, "{what}: the items for this sequence's secrets");
                let order: Vec<String> = items
                    .iter()
                    .map(|i| {
                        i["id"]
                            .as_str()
                            .unwrap()
                            .rsplit('/')
                            .next()
                            .unwrap()
                            .to_lowercase()
                    })
                    .collect();
                let mut sorted = order.clone();
                sorted.sort();
                assert_eq!(order, sorted, "{what}: Key Vault lists secrets by name");
                continue;
            }
            let expected = substitute(&step["response"], &names);
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            let answer = loop {
                let a = call(method, path, body.as_ref(), Some(&token)).await;
                let transitional = &step["while"];
                if !transitional.is_null() && a.status == transitional["status"].as_u64().unwrap() as u16 {
                    let while_body = substitute(&transitional["response"], &names);
                    assert_eq!(
                        shape(&a.body),
                        shape(&while_body),
                        "{what}: the transitional answer"
                    );
                    transitional_answers += 1;
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{what}: still transitional after 15 s"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                break a;
            };
            assert_eq!(
                u64::from(answer.status),
                step["status"].as_u64().unwrap(),
                "{what}: {}",
                answer.body
            );
            assert_eq!(
                shape(&answer.body),
                shape(&expected),
                "{what}: body shape\n  bed: {}",
                answer.body
            );
            for (header, value) in step["headers"].as_object().into_iter().flatten() {
                let got = answer.headers.get(header.as_str()).and_then(|v| v.to_str().ok());
                assert_eq!(got, value.as_str(), "{what}: header {header}");
            }
        }
    }
    // Requests sent right after a DELETE or a recover land in Key Vault's transition window.
    assert!(
        transitional_answers > 0,
        "the bed never showed a deletion or recovery under way"
    );
}

/// Errors in validating `v` against `def` of the definitions (undeclared properties, wrong
/// types, values outside an enum); `null` stands for an absent optional property, as Key
/// Vault sends `"nextLink": null`.
fn validate(defs: &Value, schema: &Value, v: &Value, at: &str) -> Vec<String> {
    if let Some(r) = schema["$ref"].as_str() {
        return validate(defs, &defs[r], v, at);
    }
    if v.is_null() {
        return vec![];
    }
    let mut errors = Vec::new();
    let ty = schema["type"].as_str().unwrap_or("object");
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "boolean" => v.is_boolean(),
        _ => false,
    };
    if !ok {
        return vec![format!("{at}: {v} is not a {ty}")];
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        errors.push(format!(
            "{at}: {v} is not one of {}",
            Value::Array(allowed.clone())
        ));
    }
    if let (Some(map), Some(props)) = (v.as_object(), schema["properties"].as_object()) {
        for (k, item) in map {
            match props.get(k) {
                Some(s) => errors.extend(validate(defs, s, item, &format!("{at}.{k}"))),
                None => errors.push(format!("{at}.{k} is not declared by the definition")),
            }
        }
    }
    if let (Some(map), Some(s)) = (v.as_object(), schema.get("additionalProperties")) {
        for (k, item) in map {
            errors.extend(validate(defs, s, item, &format!("{at}.{k}")));
        }
    }
    if let Some(items) = v.as_array() {
        for (i, item) in items.iter().enumerate() {
            errors.extend(validate(defs, &schema["items"], item, &format!("{at}[{i}]")));
        }
    }
    errors
}

fn assert_valid(defs: &Value, def: &str, answer: &Answer, what: &str) {
    let errors = validate(defs, &json!({"$ref": def}), &answer.body, def);
    assert!(
        errors.is_empty(),
        "{what}: {errors:#?}\n  answer: {}",
        answer.body
    );
}

#[tokio::test]
async fn every_operation_kvinject_uses_answers_as_the_definition_says() {
    let _vault = support::VAULT.read().await;
    let spec = fixture("spec-2025-07-01.json");
    let defs = &spec["definitions"];
    let token = token().await;
    let t = Some(token.as_str());
    let name = support::unique("conf-spec");

    // set, get latest, get a version, update, list versions, list.
    let set = call(
        "PUT",
        &format!("/secrets/{name}"),
        Some(&json!({"value": "v1"})),
        t,
    )
    .await;
    assert_eq!(set.status, 200);
    assert_valid(defs, "SecretBundle", &set, "set");
    let v1 = set.body["id"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    call(
        "PUT",
        &format!("/secrets/{name}"),
        Some(&json!({"value": "v2", "tags": {"k": "v"}})),
        t,
    )
    .await;
    let latest = call("GET", &format!("/secrets/{name}/"), None, t).await;
    assert_valid(defs, "SecretBundle", &latest, "get latest");
    assert_eq!(latest.body["value"], "v2");
    let pinned = call("GET", &format!("/secrets/{name}/{v1}"), None, t).await;
    assert_valid(defs, "SecretBundle", &pinned, "get a version");
    assert_eq!(pinned.body["value"], "v1");
    let update = call(
        "PATCH",
        &format!("/secrets/{name}/{v1}"),
        Some(&json!({"contentType": "text/plain"})),
        t,
    )
    .await;
    assert_eq!(update.status, 200);
    assert_valid(defs, "SecretBundle", &update, "update");
    assert!(
        update.body.get("value").is_none(),
        "an update answers without the value"
    );
    let versions = call("GET", &format!("/secrets/{name}/versions"), None, t).await;
    assert_valid(defs, "SecretListResult", &versions, "list versions");
    for item in versions.body["value"].as_array().unwrap() {
        assert!(item.get("value").is_none());
        assert_eq!(id_form(item["id"].as_str().unwrap()), "<secret id with version>");
    }
    assert_eq!(versions.body["value"].as_array().unwrap().len(), 2);
    let list = call("GET", "/secrets?maxresults=25", None, t).await;
    assert_valid(defs, "SecretListResult", &list, "list");
    for item in list.body["value"].as_array().unwrap() {
        assert!(item.get("value").is_none(), "a list item holds no value");
        assert_eq!(
            id_form(item["id"].as_str().unwrap()),
            "<secret id>",
            "a list item's id has no version"
        );
    }

    // Paging: 1 to 25 per page, a larger or smaller page refused as Key Vault refuses it.
    let (min, max) = (
        spec["paging"]["maxresults"]["minimum"].as_u64().unwrap(),
        spec["paging"]["maxresults"]["maximum"].as_u64().unwrap(),
    );
    let one = call("GET", &format!("/secrets?maxresults={min}"), None, t).await;
    assert_eq!(one.body["value"].as_array().unwrap().len(), 1);
    let next = one.body["nextLink"]
        .as_str()
        .expect("more than one secret in the bed: a nextLink");
    let second = call("GET", next, None, t).await;
    assert_eq!(second.status, 200);
    assert_ne!(
        second.body["value"][0]["id"], one.body["value"][0]["id"],
        "the next page moves on"
    );
    for bad in [0, max + 1, 1000] {
        let refused = call("GET", &format!("/secrets?maxresults={bad}"), None, t).await;
        assert_eq!(refused.status, 400, "maxresults={bad}");
        assert_valid(defs, "KeyVaultError", &refused, "maxresults out of range");
        assert_eq!(refused.body["error"]["code"], "BadParameter");
    }

    // Errors: not found, disabled, forbidden.
    let missing = call(
        "GET",
        &format!("/secrets/{}/", support::unique("absent")),
        None,
        t,
    )
    .await;
    assert_eq!(
        (missing.status, missing.body["error"]["code"].as_str()),
        (404, Some("SecretNotFound"))
    );
    assert_valid(defs, "KeyVaultError", &missing, "not found");
    let off = support::unique("conf-disabled");
    call(
        "PUT",
        &format!("/secrets/{off}"),
        Some(&json!({"value": "x", "attributes": {"enabled": false}})),
        t,
    )
    .await;
    let disabled = call("GET", &format!("/secrets/{off}/"), None, t).await;
    assert_eq!(disabled.status, 403);
    assert_eq!(disabled.body["error"]["code"], "Forbidden");
    assert_eq!(disabled.body["error"]["innererror"]["code"], "SecretDisabled");
    assert_valid(defs, "KeyVaultError", &disabled, "disabled");
    let denied = support::unique("conf-forbidden");
    call(
        "PUT",
        &format!("/secrets/{denied}"),
        Some(&json!({"value": "x"})),
        t,
    )
    .await;
    support::vault_control(&format!("forbid/{denied}")).await;
    let forbidden = call("GET", &format!("/secrets/{denied}/"), None, t).await;
    support::vault_control(&format!("allow/{denied}")).await;
    assert_eq!(forbidden.status, 403);
    assert_eq!(forbidden.body["error"]["code"], "Forbidden");
    assert_eq!(forbidden.body["error"]["innererror"]["code"], "ForbiddenByRbac");
    assert_valid(defs, "KeyVaultError", &forbidden, "forbidden");

    // Without a token: the challenge the SDK's bearer policy answers.
    let challenge = call("GET", &format!("/secrets/{name}/"), None, None).await;
    assert_eq!(challenge.status, 401);
    let www = challenge
        .headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        www.starts_with("Bearer authorization=\"") && www.contains("resource=\""),
        "{www}"
    );
}

#[tokio::test]
async fn names_are_case_insensitive_as_in_key_vault() {
    let _vault = support::VAULT.read().await;
    let token = token().await;
    let t = Some(token.as_str());
    let name = support::unique("Conf-Case");
    call(
        "PUT",
        &format!("/secrets/{name}"),
        Some(&json!({"value": "upper"})),
        t,
    )
    .await;
    call(
        "PUT",
        &format!("/secrets/{}", name.to_lowercase()),
        Some(&json!({"value": "lower"})),
        t,
    )
    .await;
    let got = call("GET", &format!("/secrets/{}/", name.to_uppercase()), None, t).await;
    assert_eq!(got.body["value"], "lower", "one secret, whatever the case");
    let versions = call("GET", &format!("/secrets/{name}/versions"), None, t).await;
    assert_eq!(
        versions.body["value"].as_array().unwrap().len(),
        2,
        "one version history"
    );
}
