//! What a Key Vault value becomes: any value, for an env reference, a JSON field, a docker
//! config or a registry login, is a Secret or a refusal, and a refusal never holds the value.
#![no_main]
use kvinject::{
    keyvault::{SecretValue, source::Fetched},
    materialize::desired_secret,
    mutate::{Needed, Source},
    reference::Reference,
};
use libfuzzer_sys::fuzz_target;

const MARK: &str = "FUZZ-SECRET-MARK";

fuzz_target!(|input: &str| {
    // The value always carries a mark, so that any echo of it in a message is caught.
    let value = format!("{input}{MARK}");
    let r = |field: Option<&str>| Reference {
        vault: "main".into(),
        name: "db".into(),
        version: None,
        field: field.map(Into::into),
    };
    let sources = [
        Source::Env(r(None)),
        Source::Env(r(Some("a.b"))),
        Source::Env(r(Some("items.0"))),
        Source::DockerConfig(r(None)),
        Source::RegistryLogin {
            registry: "r.example".into(),
            username: "u".into(),
            password: r(None),
        },
    ];
    let fetched = Fetched {
        value: SecretValue::new(value),
        version: "0123456789abcdef0123456789abcdef".into(),
    };
    for source in sources {
        let needed = Needed::own_read(source);
        if let Err(e) = desired_secret("ns", &needed, &fetched, &Default::default()) {
            let message = e.to_string();
            assert!(!message.contains(MARK), "a refusal echoed the value: {message}");
        }
    }
});
