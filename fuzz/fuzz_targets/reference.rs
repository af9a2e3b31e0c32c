//! The reference parser: any string is a reference, an error that names it, or nothing;
//! what parses prints back as it parsed.
#![no_main]
use kvinject::reference::{Reference, parse_list};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    if let Some(Ok(r)) = Reference::parse(input) {
        let again = Reference::parse(&r.to_string()).expect("a reference's text is a reference");
        assert_eq!(again, Ok(r.clone()), "round trip of {input:?}");
        // What goes into the request path is only ever these characters.
        assert!(r.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }
    let _ = parse_list(input);
});
