//! Typed JSON-patch helpers. Pointers are built from tokens, so `/` and `~` in annotation
//! and label keys are escaped.

use json_patch::{AddOperation, PatchOperation, ReplaceOperation, jsonptr::PointerBuf};
use serde_json::Value;

pub fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

pub fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(tokens),
        value,
    })
}

pub fn replace(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path: pointer(tokens),
        value,
    })
}

/// Adds an empty object at `tokens` unless it already exists, so later adds below it apply.
pub fn ensure_map(ops: &mut Vec<PatchOperation>, tokens: &[&str], exists: bool) {
    if !exists {
        ops.push(add(tokens, Value::Object(Default::default())));
    }
}

/// Adds an empty array at `tokens` unless it already exists.
pub fn ensure_array(ops: &mut Vec<PatchOperation>, tokens: &[&str], exists: bool) {
    if !exists {
        ops.push(add(tokens, Value::Array(Vec::new())));
    }
}
