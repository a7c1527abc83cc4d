//! `forwarded`, `baggage` and `traceparent`: never panic, and parsing what we print is the identity
//! (what we send is exactly what the peer reads).
#![no_main]

use hbone::headers::{Baggage, Forwarded, TraceParent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let f = Forwarded::parse(s);
    assert_eq!(Forwarded::parse(&f.to_string()), f, "forwarded {s:?}");
    let b = Baggage::parse(s);
    assert_eq!(Baggage::parse(&b.to_string()), b, "baggage {s:?}");
    if let Some(t) = TraceParent::parse(s) {
        assert_eq!(TraceParent::parse(&t.to_string()), Some(t));
    }
    // Whatever we print must be a legal header value.
    for value in [f.to_string(), b.to_string()] {
        assert!(http::HeaderValue::from_str(&value).is_ok(), "{value:?}");
    }
});
