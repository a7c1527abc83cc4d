//! CONNECT authorities and SPIFFE identities: never panic, and whatever parses prints back to
//! something that parses to the same value.
#![no_main]

use hbone::{Authority, Identity};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(a) = s.parse::<Authority>() {
        let printed = a.to_string();
        assert_eq!(printed.parse::<Authority>().as_ref(), Ok(&a), "{s:?} -> {printed:?}");
        // What we accept must also be a valid HTTP/2 :authority.
        assert!(printed.parse::<http::uri::Authority>().is_ok(), "{printed:?}");
    }
    if let Ok(id) = s.parse::<Identity>() {
        assert_eq!(id.to_string(), s);
        assert_eq!(Identity::from_principal(&id.principal()), Ok(id));
    }
});
