//! `kvinject lint` input: any text is documents or a syntax error, and linting never panics.
#![no_main]
use kvinject::lint::{Options, documents, lint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    let docs = documents("fuzz.yaml", input);
    let options = Options {
        default_namespace: "default".into(),
        ..Default::default()
    };
    for finding in lint(&docs, &options) {
        assert!(!finding.message.is_empty());
    }
});
