//! ABI conformance: hand-written WAT modules call each host function from each kind of callback
//! and report what the host answered, so every status code and side effect is checked against
//! what Envoy answers (the values SDKs expect), independently of any SDK.
//!
//! Modules report through the request (or response) headers the test lends them: `$st` appends a
//! status code as one character (`0`-`9`, then `A`=10, `B`=11, `C`=12, `?` otherwise) and `$flush`
//! adds them all as one `x-status` header, so `x-status: 026` reads "OK, BAD_ARGUMENT,
//! INVALID_MEMORY_ACCESS". `$emit` adds a header with a signed decimal number and `$echo` one with
//! the bytes a getter just handed over (pointer at address 8, size at 12).

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use plugins::{
    AbiVersion, Failure, Headers, Host, LoadError, MetricValue, NoCalls, NodeInfo, Plugin,
    PluginConfig, Verdict,
};
use support::{info, request, response};

// ---------------------------------------------------------------------------------------------
// Building modules.

/// Host functions by name, with the signatures of the research note (§2).
const ENV: &[(&str, &str)] = &[
    ("proxy_log", "(param i32 i32 i32) (result i32)"),
    (
        "proxy_get_buffer_bytes",
        "(param i32 i32 i32 i32 i32) (result i32)",
    ),
    (
        "proxy_set_buffer_bytes",
        "(param i32 i32 i32 i32 i32) (result i32)",
    ),
    (
        "proxy_get_header_map_pairs",
        "(param i32 i32 i32) (result i32)",
    ),
    (
        "proxy_set_header_map_pairs",
        "(param i32 i32 i32) (result i32)",
    ),
    ("proxy_get_header_map_size", "(param i32 i32) (result i32)"),
    (
        "proxy_get_header_map_value",
        "(param i32 i32 i32 i32 i32) (result i32)",
    ),
    (
        "proxy_add_header_map_value",
        "(param i32 i32 i32 i32 i32) (result i32)",
    ),
    (
        "proxy_replace_header_map_value",
        "(param i32 i32 i32 i32 i32) (result i32)",
    ),
    (
        "proxy_remove_header_map_value",
        "(param i32 i32 i32) (result i32)",
    ),
    ("proxy_continue_stream", "(param i32) (result i32)"),
    (
        "proxy_set_tick_period_milliseconds",
        "(param i32) (result i32)",
    ),
    (
        "proxy_register_shared_queue",
        "(param i32 i32 i32) (result i32)",
    ),
    (
        "proxy_enqueue_shared_queue",
        "(param i32 i32 i32) (result i32)",
    ),
    (
        "proxy_dequeue_shared_queue",
        "(param i32 i32 i32) (result i32)",
    ),
    ("proxy_close_stream", "(param i32) (result i32)"),
    (
        "proxy_send_local_response",
        "(param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)",
    ),
    (
        "proxy_grpc_call",
        "(param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)",
    ),
    ("proxy_get_status", "(param i32 i32 i32) (result i32)"),
    (
        "proxy_set_shared_data",
        "(param i32 i32 i32 i32 i32) (result i32)",
    ),
    (
        "proxy_get_shared_data",
        "(param i32 i32 i32 i32 i32) (result i32)",
    ),
    (
        "proxy_define_metric",
        "(param i32 i32 i32 i32) (result i32)",
    ),
    ("proxy_increment_metric", "(param i32 i64) (result i32)"),
    ("proxy_record_metric", "(param i32 i64) (result i32)"),
    ("proxy_get_metric", "(param i32 i32) (result i32)"),
    ("proxy_set_effective_context", "(param i32) (result i32)"),
    (
        "proxy_call_foreign_function",
        "(param i32 i32 i32 i32 i32 i32) (result i32)",
    ),
    // ABI 0.1.0 names.
    ("proxy_get_configuration", "(param i32 i32) (result i32)"),
    ("proxy_continue_request", "(result i32)"),
];

/// Memory layout of every module (2 pages):
/// - 8, 12, 16: out-parameters (pointer, size, and a third: CAS, id...); 24-36 metric ids; 40 a u64.
/// - 64..128: `$emit`'s digits, written backwards from 128.
/// - 128..192: the status characters `$st` collects.
/// - 192: the status lookup table; 208: `"x-status"`.
/// - `STRINGS..SCRATCH`: the module's `(str "...")` literals.
/// - `SCRATCH..HEAP`: free for the module (iovecs, WASI buffers).
/// - `HEAP..`: the bump allocator behind `proxy_on_memory_allocate`.
const STRINGS: usize = 256;
const SCRATCH: usize = 8192;
const HEAP: usize = 65536;

/// The parts every module has.
struct Prelude<'a> {
    /// `0_2_1`, `0_2_0`, `0_1_0`, or `None` for no marker at all.
    abi: Option<&'a str>,
    /// The name the allocator is exported as, or `None` to export none.
    allocator: Option<&'a str>,
}

/// A module with the ABI marker `abi` (`0_2_1`...), the allocator exported as
/// `proxy_on_memory_allocate`, and `body`.
fn module(abi: &str, imports: &[&str], body: &str) -> Vec<u8> {
    let prelude = Prelude {
        abi: Some(abi),
        allocator: Some("proxy_on_memory_allocate"),
    };
    compile_wat(&wat_text(&prelude, imports, body))
}

fn compile_wat(text: &str) -> Vec<u8> {
    wat::parse_str(text).unwrap_or_else(|e| panic!("{e}\n--- module ---\n{text}"))
}

/// The module text. `imports` are `env` host function names from [`ENV`] (imported as
/// `$proxy_...`) or raw `(import ...)` forms; `body` may write `(str "text")` wherever a pointer
/// and a length are expected. The reporting helpers are there when `proxy_add_header_map_value`
/// is imported; a default `proxy_on_context_create` when the body has none.
fn wat_text(prelude: &Prelude<'_>, imports: &[&str], body: &str) -> String {
    let signatures: HashMap<&str, &str> = ENV.iter().copied().collect();
    let imports: String = imports
        .iter()
        .map(|i| {
            if i.starts_with('(') {
                format!("  {i}\n")
            } else {
                let sig = signatures
                    .get(i)
                    .unwrap_or_else(|| panic!("no signature for {i}"));
                format!("  (import \"env\" \"{i}\" (func ${i} {sig}))\n")
            }
        })
        .collect();
    let marker = prelude
        .abi
        .map(|v| format!(r#"(func (export "proxy_abi_version_{v}"))"#))
        .unwrap_or_default();
    let allocator = prelude
        .allocator
        .map(|name| format!(r#"(export "{name}" (func $alloc))"#))
        .unwrap_or_default();
    let context_create = if body.contains(r#""proxy_on_context_create""#) {
        ""
    } else {
        r#"(func (export "proxy_on_context_create") (param i32 i32))"#
    };
    let helpers = if imports.contains("$proxy_add_header_map_value ") {
        REPORTING
    } else {
        ""
    };
    let (body, data) = place_strings(body);
    format!(
        r#"(module
{imports}
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const {HEAP}))
  (func $alloc (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap
      (i32.and (i32.add (i32.add (local.get $p) (local.get $size)) (i32.const 7)) (i32.const -8)))
    (local.get $p))
  {allocator}
  {marker}
  {context_create}
  {helpers}
  (data (i32.const 192) "0123456789ABC?")
  (data (i32.const 208) "x-status")
{body}
{data})
"#
    )
}

/// `$st`, `$flush`, `$emit`, `$echo`: see the module docs.
const REPORTING: &str = r#"
  (global $nst (mut i32) (i32.const 0))
  (func $st (param $s i32)
    (if (i32.gt_u (local.get $s) (i32.const 12)) (then (local.set $s (i32.const 13))))
    (i32.store8 (i32.add (i32.const 128) (global.get $nst))
      (i32.load8_u (i32.add (i32.const 192) (local.get $s))))
    (global.set $nst (i32.add (global.get $nst) (i32.const 1))))
  (func $flush (param $map i32)
    (drop (call $proxy_add_header_map_value
      (local.get $map) (i32.const 208) (i32.const 8) (i32.const 128) (global.get $nst)))
    (global.set $nst (i32.const 0)))
  (func $emit (param $map i32) (param $name i32) (param $len i32) (param $v i32)
    (local $p i32) (local $neg i32) (local $u i32)
    (local.set $p (i32.const 128))
    (local.set $neg (i32.lt_s (local.get $v) (i32.const 0)))
    (local.set $u (select (i32.sub (i32.const 0) (local.get $v)) (local.get $v) (local.get $neg)))
    (loop $digits
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $u) (i32.const 10))))
      (local.set $u (i32.div_u (local.get $u) (i32.const 10)))
      (br_if $digits (local.get $u)))
    (if (local.get $neg) (then
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p) (i32.const 45))))
    (drop (call $proxy_add_header_map_value (local.get $map) (local.get $name) (local.get $len)
      (local.get $p) (i32.sub (i32.const 128) (local.get $p)))))
  (func $echo (param $map i32) (param $name i32) (param $len i32)
    (drop (call $proxy_add_header_map_value (local.get $map) (local.get $name) (local.get $len)
      (i32.load (i32.const 8)) (i32.load (i32.const 12)))))
"#;

/// Replaces each `(str "...")` with `(i32.const PTR) (i32.const LEN)` and returns the body and
/// the data segments that put the literals there. Literals use WAT escapes (`\00`, `\n`...).
fn place_strings(body: &str) -> (String, String) {
    const OPEN: &str = "(str \"";
    let mut out = String::new();
    let mut data = String::new();
    let mut placed: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut next = STRINGS;
    let mut rest = body;
    while let Some(at) = rest.find(OPEN) {
        out.push_str(&rest[..at]);
        let lit_start = at + OPEN.len();
        let lit_len = literal_end(&rest[lit_start..]);
        let lit = &rest[lit_start..lit_start + lit_len];
        assert!(
            rest[lit_start + lit_len..].starts_with("\")"),
            "unterminated (str ...)"
        );
        let (ptr, len) = match placed.get(lit) {
            Some(&p) => p,
            None => {
                let len = unescaped_len(lit);
                data.push_str(&format!("  (data (i32.const {next}) \"{lit}\")\n"));
                placed.insert(lit, (next, len));
                next += len;
                (next - len, len)
            }
        };
        out.push_str(&format!("(i32.const {ptr}) (i32.const {len})"));
        rest = &rest[lit_start + lit_len + 2..];
    }
    out.push_str(rest);
    assert!(next <= SCRATCH, "string literals overflow their region");
    (out, data)
}

/// Index of the closing quote of a WAT string literal.
fn literal_end(s: &str) -> usize {
    let b = s.as_bytes();
    let mut i = 0;
    while b[i] != b'"' {
        i += if b[i] == b'\\' { 2 } else { 1 };
    }
    i
}

/// Bytes a WAT string literal stands for: `\hh` is one byte, `\n` and friends one.
fn unescaped_len(lit: &str) -> usize {
    let b = lit.as_bytes();
    let (mut i, mut n) = (0, 0);
    while i < b.len() {
        i += match b[i] {
            b'\\' if b.get(i + 1).is_some_and(u8::is_ascii_hexdigit) => 3,
            b'\\' => 2,
            _ => 1,
        };
        n += 1;
    }
    n
}

/// `pairs` in the ABI's map encoding, as a WAT string literal's content.
fn pairs_literal(pairs: &[(&str, &str)]) -> String {
    let mut bytes = (pairs.len() as u32).to_le_bytes().to_vec();
    for (n, v) in pairs {
        bytes.extend_from_slice(&(n.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (n, v) in pairs {
        bytes.extend_from_slice(n.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(v.as_bytes());
        bytes.push(0);
    }
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

/// Size of `h` in the pairs encoding.
fn encoded_len(h: &Headers) -> usize {
    4 + h
        .iter()
        .map(|(n, v)| 8 + n.len() + v.len() + 2)
        .sum::<usize>()
}

// ---------------------------------------------------------------------------------------------
// Running modules.

const PLUGIN_CONFIG: &str = r#"{"greeting": "hi"}"#;

fn host() -> Host {
    Host::new(NodeInfo::default(), Arc::new(NoCalls)).unwrap()
}

fn config() -> PluginConfig {
    let mut cfg = PluginConfig::new("default.abi", "abi", PLUGIN_CONFIG.as_bytes());
    cfg.instances = 1;
    cfg
}

/// Loads `wasm` with one instance and `tune` applied to its configuration.
fn load_with(host: &Host, wasm: &[u8], tune: impl FnOnce(&mut PluginConfig)) -> Plugin {
    let module = host.compile(wasm).unwrap();
    let mut cfg = config();
    tune(&mut cfg);
    host.load(&module, cfg).unwrap()
}

fn load(host: &Host, wasm: &[u8]) -> Plugin {
    load_with(host, wasm, |_| {})
}

/// One request's headers through `on_request_headers`: the verdict and the headers as they came
/// back.
async fn on_request(plugin: &Plugin, extra: &[(&str, &str)]) -> (Verdict, Headers) {
    let mut s = plugin.stream(info()).unwrap();
    let mut h = request("/", extra);
    let v = s.request_headers(&mut h, true).await;
    (v, h)
}

fn statuses(h: &Headers) -> &str {
    h.get_str("x-status").unwrap_or("<no x-status header>")
}

fn header<'a>(h: &'a Headers, name: &str) -> &'a str {
    h.get_str(name)
        .unwrap_or_else(|| panic!("no {name} header in {h:?}"))
}

// ---------------------------------------------------------------------------------------------
// 1. Loading.

#[tokio::test]
async fn module_without_abi_marker_is_refused_at_compile() {
    let host = host();
    let prelude = Prelude {
        abi: None,
        allocator: Some("proxy_on_memory_allocate"),
    };
    let wasm = compile_wat(&wat_text(&prelude, &[], ""));
    let err = host.compile(&wasm).unwrap_err();
    assert!(matches!(err, LoadError::NoAbiMarker), "{err}");

    for (marker, abi) in [
        ("0_1_0", AbiVersion::V0_1_0),
        ("0_2_0", AbiVersion::V0_2_0),
        ("0_2_1", AbiVersion::V0_2_1),
    ] {
        assert_eq!(host.compile(&module(marker, &[], "")).unwrap().abi(), abi);
    }
}

#[tokio::test]
async fn garbage_bytes_are_a_compile_error() {
    let host = host();
    for bytes in [&b"not wasm at all"[..], b"\0asm\x01\0\0\0\xff\xff", b""] {
        let err = host.compile(bytes).unwrap_err();
        assert!(matches!(err, LoadError::Compile(_)), "{err}");
    }
}

#[tokio::test]
async fn module_without_allocator_is_refused_at_load() {
    let host = host();
    let prelude = Prelude {
        abi: Some("0_2_1"),
        allocator: None,
    };
    let module = host
        .compile(&compile_wat(&wat_text(&prelude, &[], "")))
        .unwrap();
    let err = host.load(&module, config()).unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::Export {
                name: "proxy_on_memory_allocate",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn malloc_serves_as_the_allocator() {
    let host = host();
    let prelude = Prelude {
        abi: Some("0_2_1"),
        allocator: Some("malloc"),
    };
    let body = r#"
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $st (call $proxy_get_header_map_value (i32.const 0) (str ":path") (i32.const 8) (i32.const 12)))
    (call $echo (i32.const 0) (str "x-path"))
    (call $flush (i32.const 0))
    (i32.const 0))"#;
    let wasm = compile_wat(&wat_text(
        &prelude,
        &["proxy_get_header_map_value", "proxy_add_header_map_value"],
        body,
    ));
    let plugin = load(&host, &wasm);
    let (v, h) = on_request(&plugin, &[]).await;
    assert!(matches!(v, Verdict::Continue), "{v:?}");
    assert_eq!(statuses(&h), "0");
    assert_eq!(
        header(&h, "x-path"),
        "/",
        "the value was handed over through malloc"
    );
}

#[tokio::test]
async fn unknown_import_or_missing_context_create_is_refused_at_load() {
    let host = host();
    let unknown = module(
        "0_2_1",
        &[r#"(import "env" "proxy_does_not_exist" (func (param i32) (result i32)))"#],
        "",
    );
    let err = host
        .load(&host.compile(&unknown).unwrap(), config())
        .unwrap_err();
    assert!(matches!(err, LoadError::Instantiate(_)), "{err}");

    // A body that mentions the export suppresses the default one, without defining it.
    let no_context_create = module("0_2_1", &[], r#";; "proxy_on_context_create""#);
    let err = host
        .load(&host.compile(&no_context_create).unwrap(), config())
        .unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::Export {
                name: "proxy_on_context_create",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn vm_start_or_configure_returning_false_refuses_the_plugin() {
    let host = host();
    let refuse_start = module(
        "0_2_1",
        &[],
        r#"(func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 0))"#,
    );
    let err = host
        .load(&host.compile(&refuse_start).unwrap(), config())
        .unwrap_err();
    assert!(matches!(err, LoadError::VmStartRefused), "{err}");

    let refuse_config = module(
        "0_2_1",
        &[],
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 0))"#,
    );
    let err = host
        .load(&host.compile(&refuse_config).unwrap(), config())
        .unwrap_err();
    assert!(matches!(err, LoadError::ConfigureRefused), "{err}");
}

#[tokio::test]
async fn callbacks_run_in_envoys_lifecycle_order() {
    // Each callback appends its digit to a gauge: value * 10 + step.
    let body = r#"
  (func $mark (param $step i64)
    (drop (call $proxy_define_metric (i32.const 1) (str "abi_lifecycle") (i32.const 24)))
    (drop (call $proxy_get_metric (i32.load (i32.const 24)) (i32.const 40)))
    (drop (call $proxy_record_metric (i32.load (i32.const 24))
      (i64.add (i64.mul (i64.load (i32.const 40)) (i64.const 10)) (local.get $step)))))
  (func (export "proxy_on_context_create") (param $ctx i32) (param $parent i32)
    (call $mark (select (i64.const 1) (i64.const 9) (i32.eqz (local.get $parent)))))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (call $mark (i64.const 2)) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (call $mark (i64.const 3)) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (call $mark (i64.const 4)) (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (call $mark (i64.const 5)) (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (call $mark (i64.const 6)) (i32.const 1))
  (func (export "proxy_on_log") (param i32) (call $mark (i64.const 7)))
  (func (export "proxy_on_delete") (param i32) (call $mark (i64.const 8)))"#;
    let wasm = module(
        "0_2_1",
        &[
            "proxy_define_metric",
            "proxy_get_metric",
            "proxy_record_metric",
        ],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let lifecycle = |host: &Host| host.metrics().snapshot()[0].1.clone();
    // Root: created with parent 0 (1), vm start (2), configure (3).
    assert_eq!(lifecycle(&host), MetricValue::Gauge(123));

    let mut s = plugin.stream(info()).unwrap();
    let mut req = request("/", &[]);
    assert!(matches!(
        s.request_headers(&mut req, true).await,
        Verdict::Continue
    ));
    let mut resp = response();
    assert!(matches!(
        s.response_headers(&mut resp, true).await,
        Verdict::Continue
    ));
    drop(s);
    // Stream: created with the root as parent (9), headers (4, 5), done, log, delete (6, 7, 8).
    assert_eq!(lifecycle(&host), MetricValue::Gauge(123_945_678));
    assert_eq!(plugin.live_streams(), 0);

    // Dropping the plugin ends the root context: done and delete, no log.
    drop(plugin);
    assert_eq!(lifecycle(&host), MetricValue::Gauge(12_394_567_868));
}

// ---------------------------------------------------------------------------------------------
// 2. ABI versions.

#[tokio::test]
async fn abi_0_1_0_uses_two_param_headers_callback_configuration_and_empty_missing_headers() {
    let body = r#"
  (global $cfg_status (mut i32) (i32.const 99))
  (global $cfg_ptr (mut i32) (i32.const 0))
  (global $cfg_len (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (global.set $cfg_status (call $proxy_get_configuration (i32.const 8) (i32.const 12)))
    (global.set $cfg_ptr (i32.load (i32.const 8)))
    (global.set $cfg_len (i32.load (i32.const 12)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (result i32)
    (call $emit (i32.const 0) (str "x-num-headers") (local.get $n))
    ;; 0: the configuration was served in on_configure.
    (call $st (global.get $cfg_status))
    (drop (call $proxy_add_header_map_value (i32.const 0) (str "x-config")
      (global.get $cfg_ptr) (global.get $cfg_len)))
    ;; 1: and only there.
    (call $st (call $proxy_get_configuration (i32.const 8) (i32.const 12)))
    ;; 0 with an empty value: a missing header on 0.1.0.
    (i32.store (i32.const 12) (i32.const 99))
    (call $st (call $proxy_get_header_map_value (i32.const 0) (str "x-missing") (i32.const 8) (i32.const 12)))
    (call $emit (i32.const 0) (str "x-missing-len") (i32.load (i32.const 12)))
    ;; 0: the 0.1.0 continue.
    (call $st (call $proxy_continue_request))
    (call $flush (i32.const 0))
    (i32.const 0))"#;
    let wasm = module(
        "0_1_0",
        &[
            "proxy_get_configuration",
            "proxy_get_header_map_value",
            "proxy_add_header_map_value",
            "proxy_continue_request",
        ],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    assert_eq!(plugin.abi(), AbiVersion::V0_1_0);
    let (v, h) = on_request(&plugin, &[]).await;
    assert!(matches!(v, Verdict::Continue), "{v:?}");
    assert_eq!(statuses(&h), "0100");
    assert_eq!(header(&h, "x-num-headers"), "4");
    assert_eq!(header(&h, "x-config"), PLUGIN_CONFIG);
    assert_eq!(header(&h, "x-missing-len"), "0");
}

#[tokio::test]
async fn abi_0_2_missing_header_is_not_found() {
    let body = r#"
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $emit (i32.const 0) (str "x-num-headers") (local.get $n))
    (call $emit (i32.const 0) (str "x-eos") (local.get $eos))
    (call $st (call $proxy_get_header_map_value (i32.const 0) (str "x-missing") (i32.const 8) (i32.const 12)))
    (call $st (call $proxy_get_header_map_value (i32.const 0) (str ":method") (i32.const 8) (i32.const 12)))
    (call $echo (i32.const 0) (str "x-method"))
    (call $flush (i32.const 0))
    (i32.const 0))"#;
    for abi in ["0_2_0", "0_2_1"] {
        let wasm = module(
            abi,
            &["proxy_get_header_map_value", "proxy_add_header_map_value"],
            body,
        );
        let host = host();
        let plugin = load(&host, &wasm);
        let (v, h) = on_request(&plugin, &[]).await;
        assert!(matches!(v, Verdict::Continue), "{abi}: {v:?}");
        assert_eq!(statuses(&h), "10", "{abi}");
        assert_eq!(header(&h, "x-num-headers"), "4");
        assert_eq!(header(&h, "x-eos"), "1");
        assert_eq!(header(&h, "x-method"), "GET");
    }
}

#[tokio::test]
async fn command_module_is_started_with_start_and_initialize_wins_over_start() {
    let report = r#"
  (global $started (mut i32) (i32.const 0))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $emit (i32.const 0) (str "x-started") (global.get $started))
    (i32.const 0))"#;
    let start = r#"(func (export "_start") (global.set $started (i32.add (global.get $started) (i32.const 1))))"#;
    let initialize = r#"(func (export "_initialize") (global.set $started (i32.add (global.get $started) (i32.const 10))))"#;
    let host = host();

    let command = module(
        "0_2_0",
        &["proxy_add_header_map_value"],
        &format!("{report}\n{start}"),
    );
    let (_, h) = on_request(&load(&host, &command), &[]).await;
    assert_eq!(header(&h, "x-started"), "1", "_start ran once");

    let both = module(
        "0_2_0",
        &["proxy_add_header_map_value"],
        &format!("{report}\n{start}\n{initialize}"),
    );
    let (_, h) = on_request(&load(&host, &both), &[]).await;
    assert_eq!(header(&h, "x-started"), "10", "only _initialize ran");
}

#[tokio::test]
async fn start_may_exit_zero_but_not_nonzero() {
    let exit = |code: i32| {
        module(
            "0_2_0",
            &[r#"(import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))"#],
            &format!(r#"(func (export "_start") (call $proc_exit (i32.const {code})))"#),
        )
    };
    let host = host();
    let plugin = load(&host, &exit(0));
    let (v, _) = on_request(&plugin, &[]).await;
    assert!(matches!(v, Verdict::Continue), "{v:?}");

    let err = host
        .load(&host.compile(&exit(3)).unwrap(), config())
        .unwrap_err();
    assert!(matches!(err, LoadError::Trap(_)), "{err}");
}

// ---------------------------------------------------------------------------------------------
// 3. Header maps.

#[tokio::test]
async fn request_header_hostcalls_change_the_lent_headers() {
    let body = r#"
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (local $p i32) (local $size i32) (local $map_size i32)
    ;; The map as the plugin first sees it, before any change.
    (call $st (call $proxy_get_header_map_pairs (i32.const 0) (i32.const 8) (i32.const 12)))
    (local.set $p (i32.load (i32.const 8)))
    (local.set $size (i32.load (i32.const 12)))
    (call $st (call $proxy_get_header_map_size (i32.const 0) (i32.const 16)))
    (local.set $map_size (i32.load (i32.const 16)))
    (call $emit (i32.const 0) (str "x-pairs-size") (local.get $size))
    (call $emit (i32.const 0) (str "x-map-size") (local.get $map_size))
    (call $emit (i32.const 0) (str "x-pairs-count") (i32.load (local.get $p)))
    ;; The first name follows the count and the length pairs; its length is the first u32 pair.
    (drop (call $proxy_add_header_map_value (i32.const 0) (str "x-first-name")
      (i32.add (local.get $p) (i32.add (i32.const 4) (i32.mul (i32.const 8) (i32.load (local.get $p)))))
      (i32.load offset=4 (local.get $p))))
    (call $st (call $proxy_get_header_map_value (i32.const 0) (str "x-get") (i32.const 8) (i32.const 12)))
    (call $echo (i32.const 0) (str "x-got"))
    (call $st (call $proxy_replace_header_map_value (i32.const 0) (str ":path") (str "/rewritten")))
    (call $st (call $proxy_add_header_map_value (i32.const 0) (str "x-added") (str "yes")))
    (call $st (call $proxy_add_header_map_value (i32.const 0) (str "x-added") (str "again")))
    (call $st (call $proxy_replace_header_map_value (i32.const 0) (str "x-replace") (str "new")))
    (call $st (call $proxy_replace_header_map_value (i32.const 0) (str "x-fresh") (str "set")))
    (call $st (call $proxy_remove_header_map_value (i32.const 0) (str "x-remove")))
    (call $st (call $proxy_remove_header_map_value (i32.const 0) (str "x-absent")))
    (call $flush (i32.const 0))
    (i32.const 0))"#;
    let wasm = module(
        "0_2_1",
        &[
            "proxy_get_header_map_pairs",
            "proxy_get_header_map_size",
            "proxy_get_header_map_value",
            "proxy_add_header_map_value",
            "proxy_replace_header_map_value",
            "proxy_remove_header_map_value",
        ],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let extra = [
        ("x-get", "value"),
        ("x-replace", "old"),
        ("x-replace", "older"),
        ("x-remove", "gone"),
    ];
    let before = request("/", &extra);
    let (v, h) = on_request(&plugin, &extra).await;
    assert!(matches!(v, Verdict::Continue), "{v:?}");
    assert_eq!(statuses(&h), "0".repeat(10));
    assert!(h.is_modified());

    let expected_size = encoded_len(&before).to_string();
    assert_eq!(header(&h, "x-pairs-size"), expected_size);
    assert_eq!(header(&h, "x-map-size"), expected_size);
    assert_eq!(header(&h, "x-pairs-count"), before.len().to_string());
    assert_eq!(header(&h, "x-first-name"), ":method");

    assert_eq!(header(&h, "x-got"), "value");
    // `:path` keeps its place among the pseudo-headers.
    let names: Vec<&str> = h.iter().map(|(n, _)| n).collect();
    assert_eq!(names[..4], [":method", ":scheme", ":path", ":authority"]);
    assert_eq!(header(&h, ":path"), "/rewritten");
    let added: Vec<&[u8]> = h
        .iter()
        .filter(|(n, _)| *n == "x-added")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(added, [&b"yes"[..], b"again"]);
    let replaced: Vec<&[u8]> = h
        .iter()
        .filter(|(n, _)| *n == "x-replace")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(replaced, [&b"new"[..]], "replace leaves one value");
    assert_eq!(header(&h, "x-fresh"), "set");
    assert_eq!(h.get("x-remove"), None);
}

#[tokio::test]
async fn request_headers_are_read_only_in_the_response_phase() {
    let body = format!(
        r#"
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    ;; 0: still readable (the embedder kept them in the stream info).
    (call $st (call $proxy_get_header_map_value (i32.const 0) (str ":path") (i32.const 8) (i32.const 12)))
    (call $echo (i32.const 2) (str "x-request-path"))
    ;; 2 each: not writable any more.
    (call $st (call $proxy_add_header_map_value (i32.const 0) (str "x-late") (str "1")))
    (call $st (call $proxy_replace_header_map_value (i32.const 0) (str ":path") (str "/late")))
    (call $st (call $proxy_remove_header_map_value (i32.const 0) (str ":path")))
    (call $st (call $proxy_set_header_map_pairs (i32.const 0) (str "{pairs}")))
    ;; 0: the response map is.
    (call $st (call $proxy_replace_header_map_value (i32.const 2) (str "x-response") (str "ok")))
    (call $flush (i32.const 2))
    (i32.const 0))"#,
        pairs = pairs_literal(&[(":path", "/evil")])
    );
    let wasm = module(
        "0_2_1",
        &[
            "proxy_get_header_map_value",
            "proxy_add_header_map_value",
            "proxy_replace_header_map_value",
            "proxy_remove_header_map_value",
            "proxy_set_header_map_pairs",
        ],
        &body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let info = info();
    let mut s = plugin.stream(info.clone()).unwrap();
    let mut req = request("/", &[]);
    let before = req.clone();
    assert!(matches!(
        s.request_headers(&mut req, false).await,
        Verdict::Continue
    ));
    info.request.set(req.clone()).unwrap();

    let mut resp = response();
    let v = s.response_headers(&mut resp, true).await;
    assert!(matches!(v, Verdict::Continue), "{v:?}");
    assert_eq!(statuses(&resp), "022220");
    assert_eq!(header(&resp, "x-request-path"), "/");
    assert_eq!(header(&resp, "x-response"), "ok");
    assert_eq!(req, before);
    assert!(!req.is_modified());
    assert_eq!(info.request.get(), Some(&before));
}

#[tokio::test]
async fn set_header_map_pairs_replaces_the_whole_map_and_refuses_malformed_pairs() {
    let body = format!(
        r#"
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    ;; 2: a count of 5 with no lengths.
    (call $st (call $proxy_set_header_map_pairs (i32.const 0) (str "\05\00\00\00")))
    (call $st (call $proxy_set_header_map_pairs (i32.const 0) (str "{pairs}")))
    (call $flush (i32.const 0))
    (i32.const 0))"#,
        pairs = pairs_literal(&[(":path", "/only"), ("X-Only", "1")])
    );
    let wasm = module(
        "0_2_1",
        &["proxy_set_header_map_pairs", "proxy_add_header_map_value"],
        &body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let (_, h) = on_request(&plugin, &[("x-old", "1")]).await;
    let pairs: Vec<(&str, &[u8])> = h.iter().collect();
    assert_eq!(
        pairs,
        [
            (":path", &b"/only"[..]),
            ("x-only", b"1"),
            ("x-status", b"20")
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Bad pointers.

#[tokio::test]
async fn out_of_bounds_pointers_are_invalid_memory_access_not_traps() {
    let body = r#"
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    ;; 6: far past the memory, wrapping around, straddling its end.
    (call $st (call $proxy_log (i32.const 2) (i32.const 0x7fff0000) (i32.const 10)))
    (call $st (call $proxy_log (i32.const 2) (i32.const -1) (i32.const 2)))
    (call $st (call $proxy_log (i32.const 2) (i32.const 131070) (i32.const 10)))
    ;; 6: the key, the out-parameters, the value to add.
    (call $st (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x7fff0000) (i32.const 5) (i32.const 8) (i32.const 12)))
    (call $st (call $proxy_get_header_map_value (i32.const 0) (str ":path") (i32.const 0x7fff0000) (i32.const 12)))
    (call $st (call $proxy_get_header_map_value (i32.const 0) (str ":path") (i32.const 8) (i32.const -4)))
    (call $st (call $proxy_add_header_map_value (i32.const 0) (str "x-bad") (i32.const 0x7fff0000) (i32.const 3)))
    ;; 0: a null pointer with no length is an empty message; a real one.
    (call $st (call $proxy_log (i32.const 2) (i32.const 0) (i32.const 0)))
    (call $st (call $proxy_log (i32.const 2) (str "still alive")))
    ;; 2: an unknown log level.
    (call $st (call $proxy_log (i32.const 42) (str "bad level")))
    (call $flush (i32.const 0))
    (i32.const 0))"#;
    let wasm = module(
        "0_2_1",
        &[
            "proxy_log",
            "proxy_get_header_map_value",
            "proxy_add_header_map_value",
        ],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    for _ in 0..2 {
        let (v, h) = on_request(&plugin, &[]).await;
        assert!(matches!(v, Verdict::Continue), "{v:?}");
        assert_eq!(statuses(&h), "6666666002");
        assert_eq!(h.get("x-bad"), None);
    }
    assert_eq!(plugin.traps(), 0);
}

// ---------------------------------------------------------------------------------------------
// 5. Effective context.

#[tokio::test]
async fn set_effective_context_refuses_unknown_ids() {
    let body = r#"
  (global $root (mut i32) (i32.const 0))
  (func (export "proxy_on_context_create") (param $ctx i32) (param $parent i32)
    (if (i32.eqz (local.get $parent)) (then (global.set $root (local.get $ctx)))))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    ;; 2: no such context; the effective one stays this stream (0).
    (call $st (call $proxy_set_effective_context (i32.const 999)))
    (call $st (call $proxy_add_header_map_value (i32.const 0) (str "x-after-bad") (str "1")))
    ;; 0: the root is a context, but not a stream with headers (2).
    (call $st (call $proxy_set_effective_context (global.get $root)))
    (call $st (call $proxy_add_header_map_value (i32.const 0) (str "x-from-root") (str "1")))
    ;; 0: back to this stream.
    (call $st (call $proxy_set_effective_context (local.get $ctx)))
    (call $emit (i32.const 0) (str "x-root") (global.get $root))
    (call $emit (i32.const 0) (str "x-ctx") (local.get $ctx))
    (call $flush (i32.const 0))
    (i32.const 0))"#;
    let wasm = module(
        "0_2_1",
        &["proxy_set_effective_context", "proxy_add_header_map_value"],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let (v, h) = on_request(&plugin, &[]).await;
    assert!(matches!(v, Verdict::Continue), "{v:?}");
    assert_eq!(statuses(&h), "20020");
    assert_eq!(header(&h, "x-after-bad"), "1");
    assert_eq!(h.get("x-from-root"), None);
    assert_eq!(header(&h, "x-root"), "1");
    assert_eq!(header(&h, "x-ctx"), "2");
    let (_, h) = on_request(&plugin, &[]).await;
    assert_eq!(header(&h, "x-ctx"), "3", "context ids are not reused");
}

// ---------------------------------------------------------------------------------------------
// 6. Local responses.

#[tokio::test]
async fn send_local_response_overrides_the_callbacks_continue() {
    let body = format!(
        r#"
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (local $grpc i32)
    ;; gRPC status 14 when the request asks for it, else -1 (not gRPC).
    (local.set $grpc (select (i32.const 14) (i32.const -1)
      (i32.eqz (call $proxy_get_header_map_value (i32.const 0) (str "x-grpc") (i32.const 8) (i32.const 12)))))
    ;; 2: not an HTTP status.
    (call $st (call $proxy_send_local_response (i32.const 99) (str "bad") (str "") (str "") (i32.const -1)))
    (call $st (call $proxy_send_local_response (i32.const 403) (str "denied_by_abi_test")
      (str "go away\n") (str "{pairs}") (local.get $grpc)))
    (call $flush (i32.const 0))
    (i32.const 0))"#,
        pairs = pairs_literal(&[("x-reason", "test"), ("content-type", "text/plain")])
    );
    let wasm = module(
        "0_2_1",
        &[
            "proxy_send_local_response",
            "proxy_get_header_map_value",
            "proxy_add_header_map_value",
        ],
        &body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let (v, h) = on_request(&plugin, &[]).await;
    let Verdict::Local(r) = v else {
        panic!("expected a local response, got {v:?}");
    };
    assert_eq!(r.status, 403);
    assert_eq!(r.body, Bytes::from_static(b"go away\n"));
    assert_eq!(r.details, "denied_by_abi_test");
    assert!(!r.reset);
    let headers: Vec<(&str, &[u8])> = r.headers.iter().collect();
    assert_eq!(
        headers,
        [("x-reason", &b"test"[..]), ("content-type", b"text/plain")]
    );
    // The request headers come back, with what the callback did to them.
    assert_eq!(statuses(&h), "20");

    let (v, _) = on_request(&plugin, &[("x-grpc", "1")]).await;
    let Verdict::Local(r) = v else {
        panic!("expected a local response, got {v:?}");
    };
    assert_eq!(r.headers.get_str("grpc-status"), Some("14"));
}

#[tokio::test]
async fn close_stream_resets_the_stream() {
    let body = r#"
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $st (call $proxy_close_stream (i32.const 7)))
    (call $st (call $proxy_close_stream (i32.const 0)))
    (call $flush (i32.const 0))
    (i32.const 0))"#;
    let wasm = module(
        "0_2_1",
        &["proxy_close_stream", "proxy_add_header_map_value"],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let (v, h) = on_request(&plugin, &[]).await;
    let Verdict::Local(r) = v else {
        panic!("expected a reset, got {v:?}");
    };
    assert!(r.reset);
    assert_eq!(statuses(&h), "20");
}

// ---------------------------------------------------------------------------------------------
// 7-9. Traps and limits.

/// A module whose `on_request_headers` runs `action` when request header `trigger` is present
/// and otherwise reports its context id; `on_request_body` buffers until the end of the stream.
fn misbehaving(trigger: &str, action: &str) -> Vec<u8> {
    let body = format!(
        r#"
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (i32.eqz (local.get $eos)))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (if (i32.eqz (call $proxy_get_header_map_value (i32.const 0) (str "{trigger}") (i32.const 8) (i32.const 12)))
      (then {action}))
    (call $emit (i32.const 0) (str "x-ctx") (local.get $ctx))
    (i32.const 0))"#
    );
    module(
        "0_2_1",
        &["proxy_get_header_map_value", "proxy_add_header_map_value"],
        &body,
    )
}

#[tokio::test]
async fn trap_fails_the_request_and_a_fresh_instance_serves_the_next() {
    let host = host();
    let plugin = load(&host, &misbehaving("x-trap", "unreachable"));
    // Requests already on the instance when it traps: one with a body buffered, one that has not
    // run its headers yet.
    let mut buffering = plugin.stream(info()).unwrap();
    let mut req = request("/", &[]);
    assert!(matches!(
        buffering.request_headers(&mut req, false).await,
        Verdict::Continue
    ));
    let mut chunk = Some(Bytes::from_static(b"hello "));
    assert!(matches!(
        buffering.request_body(&mut chunk, false).await,
        Verdict::Continue
    ));
    assert_eq!(chunk, None, "buffered");
    let mut waiting = plugin.stream(info()).unwrap();

    let (v, h) = on_request(&plugin, &[("x-trap", "1")]).await;
    let Verdict::Failed(Failure::Trapped(why)) = v else {
        panic!("expected a trap, got {v:?}");
    };
    assert!(why.contains("unreachable"), "{why}");
    assert_eq!(plugin.traps(), 1);
    assert_eq!(h, request("/", &[("x-trap", "1")]), "headers come back");

    // The poisoned instance serves no one, but hands back what it was lent, so the embedder can
    // fail open.
    let mut req = request("/", &[]);
    let v = waiting.request_headers(&mut req, true).await;
    assert!(matches!(v, Verdict::Failed(Failure::Trapped(_))), "{v:?}");
    assert_eq!(req, request("/", &[]), "headers come back");
    let mut chunk = Some(Bytes::from_static(b"world"));
    let v = buffering.request_body(&mut chunk, true).await;
    assert!(matches!(v, Verdict::Failed(Failure::Trapped(_))), "{v:?}");
    assert_eq!(
        chunk.as_deref(),
        Some(&b"hello world"[..]),
        "the buffered body comes back whole"
    );
    drop((waiting, buffering));

    let (v, h) = on_request(&plugin, &[]).await;
    assert!(matches!(v, Verdict::Continue), "{v:?}");
    assert_eq!(header(&h, "x-ctx"), "2", "first stream of a new instance");
    assert_eq!(plugin.traps(), 1);
}

#[tokio::test]
async fn runaway_loop_is_stopped_by_the_callback_deadline() {
    let host = host();
    let wasm = misbehaving("x-loop", "(loop $forever (br $forever))");
    let plugin = load_with(&host, &wasm, |cfg| {
        cfg.limits.callback_deadline = Duration::from_millis(50);
    });
    let started = Instant::now();
    let (v, _) = on_request(&plugin, &[("x-loop", "1")]).await;
    let took = started.elapsed();
    assert!(
        matches!(v, Verdict::Failed(Failure::Trapped(_))),
        "expected an interrupt, got {v:?}"
    );
    // Far above the deadline: the point is that the loop stops at all, on a busy machine too.
    assert!(took < Duration::from_secs(10), "stopped after {took:?}");
    assert_eq!(plugin.traps(), 1);

    let (v, h) = on_request(&plugin, &[]).await;
    assert!(matches!(v, Verdict::Continue), "{v:?}");
    assert_eq!(header(&h, "x-ctx"), "2");
}

#[tokio::test]
async fn memory_grow_past_the_cap_fails_inside_the_guest() {
    let body = r#"
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $emit (i32.const 0) (str "x-grow-100") (memory.grow (i32.const 100)))
    (call $emit (i32.const 0) (str "x-grow-1") (memory.grow (i32.const 1)))
    (call $emit (i32.const 0) (str "x-grow-2") (memory.grow (i32.const 2)))
    (call $emit (i32.const 0) (str "x-pages") (memory.size))
    (i32.const 0))"#;
    let wasm = module("0_2_1", &["proxy_add_header_map_value"], body);
    let host = host();
    let plugin = load_with(&host, &wasm, |cfg| cfg.limits.memory_bytes = 4 << 16);
    // 2 pages to start with, 4 at most.
    let (v, h) = on_request(&plugin, &[]).await;
    assert!(matches!(v, Verdict::Continue), "{v:?}");
    let grown: Vec<&str> = ["x-grow-100", "x-grow-1", "x-grow-2", "x-pages"]
        .iter()
        .map(|n| header(&h, n))
        .collect();
    assert_eq!(grown, ["-1", "2", "-1", "3"]);
    let (_, h) = on_request(&plugin, &[]).await;
    let grown: Vec<&str> = ["x-grow-100", "x-grow-1", "x-grow-2", "x-pages"]
        .iter()
        .map(|n| header(&h, n))
        .collect();
    assert_eq!(grown, ["-1", "3", "-1", "4"]);
    assert_eq!(plugin.traps(), 0);

    // A module whose initial memory is already past the cap does not start.
    let module = host.compile(&wasm).unwrap();
    let mut cfg = config();
    cfg.limits.memory_bytes = 1 << 16;
    let err = host.load(&module, cfg).unwrap_err();
    assert!(matches!(err, LoadError::Instantiate(_)), "{err}");
}

// ---------------------------------------------------------------------------------------------
// 10. Shared data and metrics.

#[tokio::test]
async fn shared_data_set_get_and_compare_and_swap() {
    let body = r#"
  (global $cas (mut i32) (i32.const 0))
  (func $get (result i32)
    (call $proxy_get_shared_data (str "abi-key") (i32.const 8) (i32.const 12) (i32.const 16)))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $st (call $get))                                                                    ;; 1
    (call $st (call $proxy_set_shared_data (str "abi-key") (str "v1") (i32.const 0)))          ;; 0
    (call $st (call $get))                                                                    ;; 0
    (call $echo (i32.const 0) (str "x-v1"))
    (global.set $cas (i32.load (i32.const 16)))
    (call $emit (i32.const 0) (str "x-cas1") (global.get $cas))
    (call $st (call $proxy_set_shared_data (str "abi-key") (str "v2")
      (i32.add (global.get $cas) (i32.const 5))))                                             ;; 8
    (call $st (call $proxy_set_shared_data (str "abi-key") (str "v2") (global.get $cas)))      ;; 0
    (call $st (call $proxy_set_shared_data (str "abi-key") (str "v3") (global.get $cas)))      ;; 8: stale
    (call $st (call $get))                                                                    ;; 0
    (call $echo (i32.const 0) (str "x-v2"))
    (call $emit (i32.const 0) (str "x-cas2") (i32.load (i32.const 16)))
    (call $st (call $proxy_set_shared_data (str "abi-key") (str "v4") (i32.const 0)))          ;; 0: no CAS
    (call $st (call $get))                                                                    ;; 0
    (call $echo (i32.const 0) (str "x-v4"))
    (call $flush (i32.const 0))
    (i32.const 0))"#;
    let wasm = module(
        "0_2_1",
        &[
            "proxy_set_shared_data",
            "proxy_get_shared_data",
            "proxy_add_header_map_value",
        ],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let (_, h) = on_request(&plugin, &[]).await;
    assert_eq!(statuses(&h), "100808000");
    assert_eq!(header(&h, "x-v1"), "v1");
    assert_eq!(header(&h, "x-v2"), "v2");
    assert_eq!(header(&h, "x-v4"), "v4");
    let cas1: u32 = header(&h, "x-cas1").parse().unwrap();
    let cas2: u32 = header(&h, "x-cas2").parse().unwrap();
    assert_ne!(cas1, 0);
    assert_eq!(cas2, cas1 + 1, "every write bumps the CAS");
}

#[tokio::test]
async fn metrics_define_increment_record_and_get() {
    let body = r#"
  (func $id (param $at i32) (result i32) (i32.load (local.get $at)))
  (func $value (result i32)
    (i32.wrap_i64 (i64.load (i32.const 40))))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $st (call $proxy_define_metric (i32.const 0) (str "abi_counter") (i32.const 24)))
    (call $st (call $proxy_define_metric (i32.const 1) (str "abi_gauge") (i32.const 28)))
    (call $st (call $proxy_define_metric (i32.const 2) (str "abi_histogram") (i32.const 32)))
    (call $st (call $proxy_define_metric (i32.const 7) (str "abi_bad_type") (i32.const 36)))
    ;; Counter: up only.
    (call $st (call $proxy_increment_metric (call $id (i32.const 24)) (i64.const 5)))
    (call $st (call $proxy_increment_metric (call $id (i32.const 24)) (i64.const -1)))
    (call $st (call $proxy_get_metric (call $id (i32.const 24)) (i32.const 40)))
    (call $emit (i32.const 0) (str "x-counter") (call $value))
    ;; Gauge: down, then set.
    (call $st (call $proxy_increment_metric (call $id (i32.const 28)) (i64.const -3)))
    (call $st (call $proxy_get_metric (call $id (i32.const 28)) (i32.const 40)))
    (call $emit (i32.const 0) (str "x-gauge") (call $value))
    (call $st (call $proxy_record_metric (call $id (i32.const 28)) (i64.const 10)))
    ;; Histogram: record only, not readable.
    (call $st (call $proxy_record_metric (call $id (i32.const 32)) (i64.const 7)))
    (call $st (call $proxy_increment_metric (call $id (i32.const 32)) (i64.const 1)))
    (call $st (call $proxy_get_metric (call $id (i32.const 32)) (i32.const 40)))
    ;; Unknown ids.
    (call $st (call $proxy_get_metric (i32.const 999) (i32.const 40)))
    (call $st (call $proxy_increment_metric (i32.const 999) (i64.const 1)))
    (call $flush (i32.const 0))
    (i32.const 0))"#;
    let wasm = module(
        "0_2_1",
        &[
            "proxy_define_metric",
            "proxy_increment_metric",
            "proxy_record_metric",
            "proxy_get_metric",
            "proxy_add_header_map_value",
        ],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let expected = ["0002", "020", "00", "0", "022", "11"].concat();
    let (_, h) = on_request(&plugin, &[]).await;
    assert_eq!(statuses(&h), expected);
    assert_eq!(header(&h, "x-counter"), "5");
    assert_eq!(header(&h, "x-gauge"), "-3");
    // Defining again returns the same metrics.
    let (_, h) = on_request(&plugin, &[]).await;
    assert_eq!(statuses(&h), expected);
    assert_eq!(header(&h, "x-counter"), "10");
    assert_eq!(header(&h, "x-gauge"), "7");

    let snapshot = host.metrics().snapshot();
    let names: Vec<&str> = snapshot.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["abi_counter", "abi_gauge", "abi_histogram"]);
    assert_eq!(snapshot[0].1, MetricValue::Counter(10));
    assert_eq!(snapshot[1].1, MetricValue::Gauge(10));
    let MetricValue::Histogram { count, sum, .. } = &snapshot[2].1 else {
        panic!("histogram expected: {snapshot:?}");
    };
    assert_eq!((*count, *sum), (2, 14));
}

// ---------------------------------------------------------------------------------------------
// 11. Unknown and unsupported.

#[tokio::test]
async fn unsupported_calls_answer_like_envoy() {
    let body = r#"
  (global $cfg_status (mut i32) (i32.const 99))
  (global $cfg_size (mut i32) (i32.const 0))
  (global $cfg_ptr (mut i32) (i32.const 0))
  (global $cfg_len (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (global.set $cfg_size (local.get $size))
    (global.set $cfg_status
      (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (i32.const -1) (i32.const 8) (i32.const 12)))
    (global.set $cfg_ptr (i32.load (i32.const 8)))
    (global.set $cfg_len (i32.load (i32.const 12)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    ;; 0: the plugin configuration in on_configure, 1: not here, nor the VM configuration.
    (call $st (global.get $cfg_status))
    (call $st (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (i32.const -1) (i32.const 8) (i32.const 12)))
    (call $st (call $proxy_get_buffer_bytes (i32.const 6) (i32.const 0) (i32.const -1) (i32.const 8) (i32.const 12)))
    ;; 2: no gRPC upstream exists.
    (call $st (call $proxy_grpc_call (str "outbound|9090||grpc") (str "pkg.Service") (str "Method")
      (str "") (str "message") (i32.const 1000) (i32.const 16)))
    ;; 1: no foreign function by that name.
    (call $st (call $proxy_call_foreign_function (str "compress") (str "data") (i32.const 8) (i32.const 12)))
    ;; 1: no call response being delivered.
    (call $st (call $proxy_get_status (i32.const 8) (i32.const 12) (i32.const 16)))
    ;; 2: gRPC metadata and unknown map types.
    (call $st (call $proxy_get_header_map_value (i32.const 4) (str "k") (i32.const 8) (i32.const 12)))
    (call $st (call $proxy_get_header_map_value (i32.const 99) (str "k") (i32.const 8) (i32.const 12)))
    ;; 2: an unknown stream type.
    (call $st (call $proxy_continue_stream (i32.const 9)))
    (call $flush (i32.const 0))
    (call $emit (i32.const 0) (str "x-config-size") (global.get $cfg_size))
    (drop (call $proxy_add_header_map_value (i32.const 0) (str "x-config") (global.get $cfg_ptr) (global.get $cfg_len)))
    (i32.const 0))"#;
    let wasm = module(
        "0_2_1",
        &[
            "proxy_get_buffer_bytes",
            "proxy_grpc_call",
            "proxy_call_foreign_function",
            "proxy_get_status",
            "proxy_get_header_map_value",
            "proxy_continue_stream",
            "proxy_add_header_map_value",
        ],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let (v, h) = on_request(&plugin, &[]).await;
    assert!(matches!(v, Verdict::Continue), "{v:?}");
    assert_eq!(statuses(&h), "011211222");
    assert_eq!(header(&h, "x-config-size"), PLUGIN_CONFIG.len().to_string());
    assert_eq!(header(&h, "x-config"), PLUGIN_CONFIG);
    assert_eq!(plugin.traps(), 0);
}

#[tokio::test]
async fn request_body_can_be_read_and_rewritten_at_the_end_of_the_stream() {
    let body = r#"
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    ;; Buffer until the end of the stream.
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
    ;; "world" out of "hello world".
    (call $st (call $proxy_get_buffer_bytes (i32.const 0) (i32.const 6) (i32.const 5) (i32.const 8) (i32.const 12)))
    (call $st (call $proxy_set_buffer_bytes (i32.const 0) (i32.const 0) (i32.const 0) (str "<")))
    (call $st (call $proxy_set_buffer_bytes (i32.const 0) (i32.const -1) (i32.const 0) (str ">")))
    (call $st (call $proxy_set_buffer_bytes (i32.const 0) (i32.const -1) (i32.const 0)
      (i32.load (i32.const 8)) (i32.load (i32.const 12))))
    ;; 1: no response body in the request phase.
    (call $st (call $proxy_get_buffer_bytes (i32.const 1) (i32.const 0) (i32.const -1) (i32.const 8) (i32.const 12)))
    ;; Append the statuses to the body itself: the headers are not lent now.
    (drop (call $proxy_set_buffer_bytes (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 128) (global.get $nst)))
    (i32.const 0))"#;
    let wasm = module(
        "0_2_1",
        &[
            "proxy_get_buffer_bytes",
            "proxy_set_buffer_bytes",
            "proxy_add_header_map_value",
        ],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let mut s = plugin.stream(info()).unwrap();
    let mut req = request("/", &[]);
    assert!(matches!(
        s.request_headers(&mut req, false).await,
        Verdict::Continue
    ));
    let mut chunk = Some(Bytes::from_static(b"hello "));
    assert!(matches!(
        s.request_body(&mut chunk, false).await,
        Verdict::Continue
    ));
    assert_eq!(chunk, None, "buffered while the plugin pauses");
    let mut chunk = Some(Bytes::from_static(b"world"));
    let v = s.request_body(&mut chunk, true).await;
    assert!(matches!(v, Verdict::Continue), "{v:?}");
    assert_eq!(chunk.as_deref(), Some(&b"<hello world>world00001"[..]));
}

// ---------------------------------------------------------------------------------------------
// 12. WASI.

/// A module that writes to stdout and stderr and reads its environment and arguments through
/// WASI module `wasi`, from `on_request_headers`.
fn wasi_module(wasi: &str) -> Vec<u8> {
    let import =
        |name: &str, sig: &str| format!(r#"(import "{wasi}" "{name}" (func ${name} {sig}))"#);
    let imports = [
        import("fd_write", "(param i32 i32 i32 i32) (result i32)"),
        import("environ_sizes_get", "(param i32 i32) (result i32)"),
        import("environ_get", "(param i32 i32) (result i32)"),
        import("args_sizes_get", "(param i32 i32) (result i32)"),
        import("poll_oneoff", "(param i32 i32 i32 i32) (result i32)"),
    ];
    let mut names: Vec<&str> = imports.iter().map(String::as_str).collect();
    names.push("proxy_add_header_map_value");
    let body = r#"
  ;; One iovec at 8192, bytes written at 8200; environment sizes at 8208, arguments' at 8216;
  ;; environment pointers from 8256, its strings from 9216.
  (func $iov (param $ptr i32) (param $len i32)
    (i32.store (i32.const 8192) (local.get $ptr))
    (i32.store (i32.const 8196) (local.get $len)))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $iov (str "hello from a plugin\n"))
    (call $st (call $fd_write (i32.const 1) (i32.const 8192) (i32.const 1) (i32.const 8200)))
    (call $emit (i32.const 0) (str "x-written") (i32.load (i32.const 8200)))
    (call $st (call $fd_write (i32.const 2) (i32.const 8192) (i32.const 1) (i32.const 8200)))
    ;; 8 (EBADF): no such file descriptor.
    (call $st (call $fd_write (i32.const 7) (i32.const 8192) (i32.const 1) (i32.const 8200)))
    (call $st (call $environ_sizes_get (i32.const 8208) (i32.const 8212)))
    (call $emit (i32.const 0) (str "x-env-count") (i32.load (i32.const 8208)))
    (call $st (call $environ_get (i32.const 8256) (i32.const 9216)))
    (drop (call $proxy_add_header_map_value (i32.const 0) (str "x-env")
      (i32.const 9216) (i32.load (i32.const 8212))))
    (call $st (call $args_sizes_get (i32.const 8216) (i32.const 8220)))
    (call $emit (i32.const 0) (str "x-args") (i32.add (i32.load (i32.const 8216)) (i32.load (i32.const 8220))))
    ;; Nothing to wait for: no events, right away.
    (i32.store (i32.const 8224) (i32.const 99))
    (call $st (call $poll_oneoff (i32.const 8448) (i32.const 8704) (i32.const 1) (i32.const 8224)))
    (call $emit (i32.const 0) (str "x-events") (i32.load (i32.const 8224)))
    (call $flush (i32.const 0))
    (i32.const 0))"#;
    module("0_2_1", &names, body)
}

async fn wasi_writes_and_sees_only_the_plugin_env(wasi: &str) {
    assert!(
        std::env::vars_os().next().is_some(),
        "the test process has an environment to leak"
    );
    let host = host();
    let plugin = load_with(&host, &wasi_module(wasi), |cfg| {
        cfg.env = vec![
            ("ABI_A".into(), "1".into()),
            ("ABI_B".into(), "two words".into()),
        ];
    });
    for _ in 0..2 {
        let (v, h) = on_request(&plugin, &[]).await;
        assert!(matches!(v, Verdict::Continue), "{wasi}: {v:?}");
        assert_eq!(statuses(&h), "0080000", "{wasi}");
        assert_eq!(
            header(&h, "x-written"),
            "hello from a plugin\n".len().to_string()
        );
        assert_eq!(header(&h, "x-env-count"), "2");
        assert_eq!(h.get("x-env"), Some(&b"ABI_A=1\0ABI_B=two words\0"[..]));
        assert_eq!(header(&h, "x-args"), "0");
        assert_eq!(header(&h, "x-events"), "0");
    }
    assert_eq!(plugin.traps(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_snapshot_preview1_writes_and_sees_only_the_plugin_env() {
    wasi_writes_and_sees_only_the_plugin_env("wasi_snapshot_preview1").await;
}

#[tokio::test]
async fn wasi_unstable_writes_and_sees_only_the_plugin_env() {
    wasi_writes_and_sees_only_the_plugin_env("wasi_unstable").await;
}

/// A metric's value from the host's snapshot.
fn metric(host: &Host, name: &str) -> u64 {
    host.metrics()
        .snapshot()
        .into_iter()
        .find(|(n, _)| n == name)
        .map_or(0, |(_, v)| match v {
            plugins::MetricValue::Counter(n) => n,
            other => panic!("{name} is {other:?}"),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_reach_the_root_context_until_the_plugin_is_removed() {
    let body = r#"
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (drop (call $proxy_define_metric (i32.const 0) (str "abi_ticks") (i32.const 24)))
    (drop (call $proxy_set_tick_period_milliseconds (i32.const 10)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param $root i32)
    (drop (call $proxy_increment_metric (i32.load (i32.const 24)) (i64.const 1))))"#;
    let wasm = module(
        "0_2_1",
        &[
            "proxy_define_metric",
            "proxy_increment_metric",
            "proxy_set_tick_period_milliseconds",
        ],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&host, "abi_ticks") < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ticks = metric(&host, "abi_ticks");
    assert!(ticks >= 5, "{ticks} ticks in 5 s at a 10 ms period");
    drop(plugin);
    // A tick already running when the plugin went may still finish.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = metric(&host, "abi_ticks");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        metric(&host, "abi_ticks"),
        after,
        "a removed plugin stops ticking"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueued_item_wakes_the_registering_root_context() {
    let body = r#"
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (drop (call $proxy_define_metric (i32.const 0) (str "abi_dequeued") (i32.const 24)))
    (drop (call $proxy_register_shared_queue (str "jobs") (i32.const 28)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $st (call $proxy_enqueue_shared_queue (i32.load (i32.const 28)) (str "job")))
    (call $flush (i32.const 0))
    (i32.const 0))
  (func (export "proxy_on_queue_ready") (param $root i32) (param $queue i32)
    ;; Drain it: one item, then EMPTY (7) ends the loop.
    (block $done
      (loop $more
        (br_if $done (call $proxy_dequeue_shared_queue (local.get $queue) (i32.const 8) (i32.const 12)))
        (drop (call $proxy_increment_metric (i32.load (i32.const 24)) (i64.const 1)))
        (br $more))))"#;
    let wasm = module(
        "0_2_1",
        &[
            "proxy_define_metric",
            "proxy_increment_metric",
            "proxy_register_shared_queue",
            "proxy_enqueue_shared_queue",
            "proxy_dequeue_shared_queue",
            "proxy_add_header_map_value",
        ],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    for _ in 0..3 {
        let (_, h) = on_request(&plugin, &[]).await;
        assert_eq!(statuses(&h), "0");
    }
    // The callback runs in a task of its own once the instance is free.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&host, "abi_dequeued") < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(metric(&host, "abi_dequeued"), 3);
}

#[tokio::test]
async fn response_trailers_are_lent_to_their_callback() {
    let body = r#"
  (func (export "proxy_on_response_trailers") (param $ctx i32) (param $n i32) (result i32)
    (call $st (call $proxy_get_header_map_value (i32.const 3) (str "grpc-status") (i32.const 8) (i32.const 12)))
    (call $echo (i32.const 3) (str "x-seen-status"))
    (call $emit (i32.const 3) (str "x-count") (local.get $n))
    (call $st (call $proxy_remove_header_map_value (i32.const 3) (str "grpc-message")))
    ;; Request trailers are never available here.
    (call $st (call $proxy_get_header_map_value (i32.const 1) (str "x") (i32.const 8) (i32.const 12)))
    (call $flush (i32.const 3))
    (i32.const 0))"#;
    let wasm = module(
        "0_2_1",
        &[
            "proxy_get_header_map_value",
            "proxy_remove_header_map_value",
            "proxy_add_header_map_value",
        ],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let mut stream = plugin.stream(info()).unwrap();
    let mut trailers = Headers::new();
    trailers.push("grpc-status", "0");
    trailers.push("grpc-message", "ok");
    assert!(matches!(
        stream.response_trailers(&mut trailers).await,
        Verdict::Continue
    ));
    assert_eq!(trailers.get_str("x-seen-status"), Some("0"));
    assert_eq!(trailers.get_str("x-count"), Some("2"));
    assert!(trailers.get("grpc-message").is_none());
    assert_eq!(statuses(&trailers), "002");
}

#[tokio::test]
async fn request_trailers_are_lent_to_their_callback() {
    let body = r#"
  (func (export "proxy_on_request_trailers") (param $ctx i32) (param $n i32) (result i32)
    (call $st (call $proxy_get_header_map_value (i32.const 1) (str "x-checksum") (i32.const 8) (i32.const 12)))
    (call $echo (i32.const 1) (str "x-seen-checksum"))
    (call $emit (i32.const 1) (str "x-count") (local.get $n))
    ;; Response trailers are not available while the request's are.
    (call $st (call $proxy_get_header_map_value (i32.const 3) (str "x") (i32.const 8) (i32.const 12)))
    (call $flush (i32.const 1))
    (i32.const 0))"#;
    let wasm = module(
        "0_2_1",
        &["proxy_get_header_map_value", "proxy_add_header_map_value"],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let mut stream = plugin.stream(info()).unwrap();
    let mut trailers = Headers::new();
    trailers.push("x-checksum", "abc");
    assert!(matches!(
        stream.request_trailers(&mut trailers).await,
        Verdict::Continue
    ));
    assert_eq!(trailers.get_str("x-seen-checksum"), Some("abc"));
    assert_eq!(trailers.get_str("x-count"), Some("1"));
    assert_eq!(statuses(&trailers), "02");
}

// ---------------------------------------------------------------------------------------------
// 6. Properties.

#[tokio::test]
async fn properties_are_read_and_written_through_the_host_call() {
    let body = r#"
  (global $cfg_status (mut i32) (i32.const 99))
  (global $cfg_ptr (mut i32) (i32.const 0))
  (global $cfg_len (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    ;; The root context reads plugin facts too.
    (global.set $cfg_status
      (call $proxy_get_property (str "plugin_name") (i32.const 8) (i32.const 12)))
    (global.set $cfg_ptr (i32.load (i32.const 8)))
    (global.set $cfg_len (i32.load (i32.const 12)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $st (global.get $cfg_status))
    (drop (call $proxy_add_header_map_value (i32.const 0) (str "x-plugin") (global.get $cfg_ptr) (global.get $cfg_len)))
    ;; 0: segments are NUL-separated.
    (call $st (call $proxy_get_property (str "request\00path") (i32.const 8) (i32.const 12)))
    (call $echo (i32.const 0) (str "x-path"))
    ;; 0: a trailing NUL is tolerated, as Envoy does.
    (call $st (call $proxy_get_property (str "request\00method\00") (i32.const 8) (i32.const 12)))
    (call $echo (i32.const 0) (str "x-method"))
    ;; 0: integers are 8 bytes, little-endian.
    (call $st (call $proxy_get_property (str "destination\00port") (i32.const 8) (i32.const 12)))
    (call $emit (i32.const 0) (str "x-port-size") (i32.load (i32.const 12)))
    (call $emit (i32.const 0) (str "x-port") (i32.load (i32.load (i32.const 8))))
    ;; 0: the peer's SPIFFE id.
    (call $st (call $proxy_get_property (str "connection\00uri_san_peer_certificate") (i32.const 8) (i32.const 12)))
    (call $echo (i32.const 0) (str "x-peer"))
    ;; 1: nothing by that name.
    (call $st (call $proxy_get_property (str "no\00such") (i32.const 8) (i32.const 12)))
    ;; 1, 0, 0: a value set on this request reads back on it, and only on it.
    (call $st (call $proxy_get_property (str "wasm\00custom") (i32.const 8) (i32.const 12)))
    (call $st (call $proxy_set_property (str "wasm\00custom") (str "v1")))
    (call $st (call $proxy_get_property (str "wasm\00custom") (i32.const 8) (i32.const 12)))
    (call $echo (i32.const 0) (str "x-custom"))
    ;; 6, 6: paths and values outside memory.
    (call $st (call $proxy_get_property (i32.const 200000) (i32.const 4) (i32.const 8) (i32.const 12)))
    (call $st (call $proxy_set_property (str "k") (i32.const 200000) (i32.const 4)))
    (call $flush (i32.const 0))
    (i32.const 0))"#;
    let wasm = module(
        "0_2_1",
        &[
            "(import \"env\" \"proxy_get_property\" (func $proxy_get_property (param i32 i32 i32 i32) (result i32)))",
            "(import \"env\" \"proxy_set_property\" (func $proxy_set_property (param i32 i32 i32 i32) (result i32)))",
            "proxy_add_header_map_value",
        ],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    for _ in 0..2 {
        let (v, h) = on_request(&plugin, &[]).await;
        assert!(matches!(v, Verdict::Continue), "{v:?}");
        assert_eq!(statuses(&h), "00000110066");
        assert_eq!(header(&h, "x-plugin"), "default.abi");
        assert_eq!(header(&h, "x-path"), "/");
        assert_eq!(header(&h, "x-method"), "GET");
        assert_eq!(header(&h, "x-port-size"), "8");
        assert_eq!(header(&h, "x-port"), "8080");
        assert_eq!(
            header(&h, "x-peer"),
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(header(&h, "x-custom"), "v1");
    }
    assert_eq!(plugin.traps(), 0);
}

// ---------------------------------------------------------------------------------------------
// 7. HTTP calls and pauses.

/// Upstreams for the call tests: `ok` answers 200 with a header, a body and a trailer; `fail`
/// fails as a reset connection would; any other name is unknown.
struct Calls;

impl plugins::Dispatcher for Calls {
    fn dispatch(
        &self,
        upstream: &str,
        request: plugins::CallRequest,
    ) -> Option<plugins::CallFuture> {
        let ok = match upstream {
            "ok" => true,
            "fail" => false,
            _ => return None,
        };
        Some(Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if !ok {
                return Err("connection reset".to_owned());
            }
            let mut headers = Headers::new();
            headers.push(":status", "200");
            headers.push(
                "x-echo-path",
                request.headers.get_str(":path").unwrap_or_default(),
            );
            let mut trailers = Headers::new();
            trailers.push("x-done", "yes");
            Ok(plugins::CallResponse {
                headers,
                body: Bytes::from_static(b"answer"),
                trailers,
            })
        }))
    }
}

fn call_host() -> Host {
    Host::new(NodeInfo::default(), Arc::new(Calls)).unwrap()
}

/// Headers of a well-formed call, and of one without `:path`.
fn call_headers() -> (String, String) {
    let full = pairs_literal(&[
        (":method", "GET"),
        (":path", "/check"),
        (":authority", "auth"),
    ]);
    let no_path = pairs_literal(&[(":method", "GET"), (":authority", "auth")]);
    (full, no_path)
}

#[tokio::test]
async fn http_calls_refuse_bad_arguments_and_deliver_answers_and_failures_to_the_root() {
    let (full, no_path) = call_headers();
    let body = format!(
        r#"
  (global $stream (mut i32) (i32.const 0))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    ;; 2, 2, 2: no :path, a negative timeout, an unknown upstream.
    (call $st (call $proxy_http_call (str "ok") (str "{no_path}") (str "") (str "") (i32.const 1000) (i32.const 16)))
    (call $st (call $proxy_http_call (str "ok") (str "{full}") (str "") (str "") (i32.const -1) (i32.const 16)))
    (call $st (call $proxy_http_call (str "nowhere") (str "{full}") (str "") (str "") (i32.const 1000) (i32.const 16)))
    ;; 6: headers outside memory.
    (call $st (call $proxy_http_call (str "ok") (i32.const 200000) (i32.const 40) (str "") (str "") (i32.const 1000) (i32.const 16)))
    ;; 0: a call to the upstream the request names; the request waits for it.
    (drop (call $proxy_get_header_map_value (i32.const 0) (str "x-upstream") (i32.const 8) (i32.const 12)))
    (call $st (call $proxy_http_call (i32.load (i32.const 8)) (i32.load (i32.const 12))
      (str "{full}") (str "body") (str "") (i32.const 1000) (i32.const 16)))
    (global.set $stream (local.get $ctx))
    (i32.const 1))
  (func (export "proxy_on_http_call_response")
    (param $root i32) (param $token i32) (param $headers i32) (param $body i32) (param $trailers i32)
    (local $s i32)
    ;; Answers come to the root context; the plugin picks the stream to act on.
    (call $st (call $proxy_set_effective_context (global.get $stream)))
    (call $emit (i32.const 0) (str "x-root") (local.get $root))
    (call $emit (i32.const 0) (str "x-call-headers") (local.get $headers))
    (call $emit (i32.const 0) (str "x-call-body") (local.get $body))
    (call $emit (i32.const 0) (str "x-call-trailers") (local.get $trailers))
    (call $st (call $proxy_get_status (i32.const 16) (i32.const 8) (i32.const 12)))
    (call $emit (i32.const 0) (str "x-call-status") (i32.load (i32.const 16)))
    (call $echo (i32.const 0) (str "x-call-message"))
    (local.set $s
      (call $proxy_get_header_map_value (i32.const 6) (str "x-echo-path") (i32.const 8) (i32.const 12)))
    (call $st (local.get $s))
    (if (i32.eqz (local.get $s)) (then (call $echo (i32.const 0) (str "x-call-path"))))
    (call $st (call $proxy_get_buffer_bytes (i32.const 4) (i32.const 0) (local.get $body) (i32.const 8) (i32.const 12)))
    (call $st (call $proxy_get_header_map_value (i32.const 7) (str "x-done") (i32.const 8) (i32.const 12)))
    (call $flush (i32.const 0))
    (drop (call $proxy_continue_stream (i32.const 0))))"#
    );
    let wasm = module(
        "0_2_1",
        &[
            "(import \"env\" \"proxy_http_call\" (func $proxy_http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))",
            "proxy_get_header_map_value",
            "proxy_set_effective_context",
            "proxy_get_status",
            "proxy_get_buffer_bytes",
            "proxy_continue_stream",
            "proxy_add_header_map_value",
        ],
        &body,
    );
    let host = call_host();
    let plugin = load(&host, &wasm);

    let (v, h) = on_request(&plugin, &[("x-upstream", "ok")]).await;
    assert!(matches!(v, Verdict::Continue), "{v:?}");
    // The request's calls (2 2 2 6 0), then in the answer: effective context, status, header,
    // body, trailer.
    assert_eq!(statuses(&h), "2226000000");
    assert_eq!(header(&h, "x-root"), "1");
    assert_eq!(header(&h, "x-call-headers"), "2");
    assert_eq!(header(&h, "x-call-body"), "6");
    assert_eq!(header(&h, "x-call-trailers"), "1");
    assert_eq!(header(&h, "x-call-status"), "0");
    assert_eq!(header(&h, "x-call-path"), "/check");

    // A failed call: no headers, no body, and the status says why.
    let (v, h) = on_request(&plugin, &[("x-upstream", "fail")]).await;
    assert!(matches!(v, Verdict::Continue), "{v:?}");
    assert_eq!(statuses(&h), "2226000111");
    assert_eq!(header(&h, "x-call-headers"), "0");
    assert_eq!(header(&h, "x-call-body"), "0");
    assert_eq!(header(&h, "x-call-status"), "11");
    assert_eq!(header(&h, "x-call-message"), "connection reset");
    assert!(h.get("x-call-path").is_none());
    assert_eq!(plugin.traps(), 0);
}

#[tokio::test]
async fn a_paused_response_goes_on_when_the_call_answers() {
    let (full, _) = call_headers();
    let body = format!(
        r#"
  (global $stream (mut i32) (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $st (call $proxy_http_call (str "ok") (str "{full}") (str "") (str "") (i32.const 1000) (i32.const 16)))
    (global.set $stream (local.get $ctx))
    (i32.const 1))
  (func (export "proxy_on_http_call_response")
    (param $root i32) (param $token i32) (param $headers i32) (param $body i32) (param $trailers i32)
    (drop (call $proxy_set_effective_context (global.get $stream)))
    ;; The response the stream was lent is still there to change, status included.
    (call $st (call $proxy_replace_header_map_value (i32.const 2) (str ":status") (str "203")))
    (call $st (call $proxy_get_header_map_value (i32.const 6) (str "x-echo-path") (i32.const 8) (i32.const 12)))
    (call $echo (i32.const 2) (str "x-scanned"))
    (call $flush (i32.const 2))
    ;; 0: continuing the response (stream type 1).
    (drop (call $proxy_continue_stream (i32.const 1))))"#
    );
    let wasm = module(
        "0_2_1",
        &[
            "(import \"env\" \"proxy_http_call\" (func $proxy_http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))",
            "proxy_get_header_map_value",
            "proxy_replace_header_map_value",
            "proxy_set_effective_context",
            "proxy_continue_stream",
            "proxy_add_header_map_value",
        ],
        &body,
    );
    let host = call_host();
    let plugin = load(&host, &wasm);
    let mut s = plugin.stream(info()).unwrap();
    let mut req = request("/", &[]);
    assert!(matches!(
        s.request_headers(&mut req, true).await,
        Verdict::Continue
    ));
    let mut resp = response();
    let started = Instant::now();
    let v = s.response_headers(&mut resp, false).await;
    assert!(matches!(v, Verdict::Continue), "{v:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(5),
        "it waited for the call"
    );
    assert_eq!(statuses(&resp), "000");
    assert_eq!(header(&resp, ":status"), "203");
    assert_eq!(header(&resp, "x-scanned"), "/check");
    assert!(resp.is_modified());
}

#[tokio::test]
async fn a_deferred_done_waits_for_proxy_done_before_the_log() {
    let (full, _) = call_headers();
    let body = format!(
        r#"
  (global $stream (mut i32) (i32.const 0))
  (func $count (param $name i32) (param $len i32)
    (drop (call $proxy_define_metric (i32.const 0) (local.get $name) (local.get $len) (i32.const 24)))
    (drop (call $proxy_increment_metric (i32.load (i32.const 24)) (i64.const 1))))
  (func $status (param $name i32) (param $len i32) (param $s i32)
    (drop (call $proxy_define_metric (i32.const 1) (local.get $name) (local.get $len) (i32.const 24)))
    (drop (call $proxy_record_metric (i32.load (i32.const 24)) (i64.extend_i32_u (local.get $s)))))
  (func (export "proxy_on_done") (param $ctx i32) (result i32)
    ;; Not a deferred context yet: proxy_done has nothing to finish (1, recorded as 101).
    (call $status (str "abi_early_done") (i32.add (i32.const 100) (call $proxy_done)))
    ;; Flush something first: ask a service, finish when it answers.
    (drop (call $proxy_http_call (str "ok") (str "{full}") (str "") (str "") (i32.const 1000) (i32.const 16)))
    (global.set $stream (local.get $ctx))
    (i32.const 0))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    (drop (call $proxy_set_effective_context (global.get $stream)))
    (call $status (str "abi_done") (i32.add (i32.const 100) (call $proxy_done))))
  (func (export "proxy_on_log") (param $ctx i32)
    (call $count (str "abi_logged")))"#
    );
    let wasm = module(
        "0_2_1",
        &[
            "(import \"env\" \"proxy_http_call\" (func $proxy_http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))",
            "(import \"env\" \"proxy_done\" (func $proxy_done (result i32)))",
            "proxy_set_effective_context",
            "proxy_define_metric",
            "proxy_increment_metric",
            "proxy_record_metric",
        ],
        &body,
    );
    let host = call_host();
    let plugin = load(&host, &wasm);
    let s = plugin.stream(info()).unwrap();
    drop(s);
    assert_eq!(gauge(&host, "abi_early_done"), 101);
    assert_eq!(metric(&host, "abi_logged"), 0, "on_log waits");
    assert_eq!(plugin.live_streams(), 1, "the context lives on");
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&host, "abi_logged") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(gauge(&host, "abi_done"), 100, "proxy_done answered OK");
    assert_eq!(metric(&host, "abi_logged"), 1);
    assert_eq!(plugin.live_streams(), 0);
}

fn gauge(host: &Host, name: &str) -> i64 {
    host.metrics()
        .snapshot()
        .into_iter()
        .find(|(n, _)| n == name)
        .map_or(-1, |(_, v)| match v {
            MetricValue::Gauge(n) => n,
            other => panic!("{name} is {other:?}"),
        })
}

#[tokio::test]
async fn clock_log_level_buffer_status_queues_and_legacy_calls_answer_ok() {
    let body = r#"
  (func $gauge (param $name i32) (param $len i32) (param $v i32)
    (drop (call $proxy_define_metric (i32.const 1) (local.get $name) (local.get $len) (i32.const 24)))
    (drop (call $proxy_record_metric (i32.load (i32.const 24)) (i64.extend_i32_u (local.get $v)))))
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    ;; Headers are not lent to body callbacks: report through gauges. Statuses as digits:
    ;; 0 and the body's length; 1: no response body yet; 2: no such buffer type.
    (call $gauge (str "abi_body_status")
      (i32.add (i32.const 1000) (i32.add
        (i32.mul (i32.const 100) (call $proxy_get_buffer_status (i32.const 0) (i32.const 16) (i32.const 20)))
        (i32.add
          (i32.mul (i32.const 10) (call $proxy_get_buffer_status (i32.const 1) (i32.const 28) (i32.const 32)))
          (call $proxy_get_buffer_status (i32.const 99) (i32.const 28) (i32.const 32))))))
    (call $gauge (str "abi_body_len") (i32.load (i32.const 16)))
    (i32.const 0))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    ;; 0: the log level (info is 2).
    (call $st (call $proxy_get_log_level (i32.const 16)))
    (call $emit (i32.const 0) (str "x-log-level") (i32.load (i32.const 16)))
    ;; 0: wall-clock nanoseconds; seconds since the epoch fit in the high word's range.
    (call $st (call $proxy_get_current_time_nanoseconds (i32.const 40)))
    (call $emit (i32.const 0) (str "x-seconds")
      (i32.wrap_i64 (i64.div_u (i64.load (i32.const 40)) (i64.const 1000000000))))
    ;; 1, then 0 0: a queue nobody registered, then one this plugin registers and resolves.
    (call $st (call $proxy_resolve_shared_queue (str "") (str "abi-q") (i32.const 16)))
    (call $st (call $proxy_register_shared_queue (str "abi-q") (i32.const 16)))
    (call $st (call $proxy_resolve_shared_queue (str "") (str "abi-q") (i32.const 20)))
    (call $emit (i32.const 0) (str "x-same-queue") (i32.eq (i32.load (i32.const 16)) (i32.load (i32.const 20))))
    ;; 0 0: calls of older SDKs.
    (call $st (call $proxy_clear_route_cache))
    (call $st (call $proxy_continue_response))
    (call $flush (i32.const 0))
    (i32.const 0))"#;
    let wasm = module(
        "0_2_1",
        &[
            "(import \"env\" \"proxy_get_log_level\" (func $proxy_get_log_level (param i32) (result i32)))",
            "(import \"env\" \"proxy_get_current_time_nanoseconds\" (func $proxy_get_current_time_nanoseconds (param i32) (result i32)))",
            "(import \"env\" \"proxy_get_buffer_status\" (func $proxy_get_buffer_status (param i32 i32 i32) (result i32)))",
            "(import \"env\" \"proxy_resolve_shared_queue\" (func $proxy_resolve_shared_queue (param i32 i32 i32 i32 i32) (result i32)))",
            "(import \"env\" \"proxy_clear_route_cache\" (func $proxy_clear_route_cache (result i32)))",
            "(import \"env\" \"proxy_continue_response\" (func $proxy_continue_response (result i32)))",
            "proxy_register_shared_queue",
            "proxy_define_metric",
            "proxy_record_metric",
            "proxy_add_header_map_value",
        ],
        body,
    );
    let host = host();
    let plugin = load(&host, &wasm);
    let mut s = plugin.stream(info()).unwrap();
    let mut h = request("/", &[]);
    assert!(matches!(
        s.request_headers(&mut h, false).await,
        Verdict::Continue
    ));
    assert_eq!(statuses(&h), "0010000");
    let level: u32 = header(&h, "x-log-level").parse().unwrap();
    assert!(level <= 5, "a proxy-wasm log level: {level}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let seconds: i64 = header(&h, "x-seconds").parse().unwrap();
    assert!(
        (now - seconds).abs() <= 2,
        "the plugin's clock is the wall clock: {seconds} vs {now}"
    );
    assert_eq!(header(&h, "x-same-queue"), "1");

    let mut chunk = Some(Bytes::from_static(b"twelve bytes"));
    assert!(matches!(
        s.request_body(&mut chunk, true).await,
        Verdict::Continue
    ));
    assert_eq!(chunk.as_deref(), Some(&b"twelve bytes"[..]));
    assert_eq!(gauge(&host, "abi_body_status"), 1012);
    assert_eq!(gauge(&host, "abi_body_len"), 12);
    assert_eq!(plugin.traps(), 0);
}

/// A body plugin that buffers until the end of the stream.
const BUFFERING: &str = r#"
  (func (export "proxy_on_request_body") (param i32) (param i32) (param $eos i32) (result i32)
    (select (i32.const 0) (i32.const 1) (local.get $eos)))
  (func (export "proxy_on_response_body") (param i32) (param i32) (param $eos i32) (result i32)
    (select (i32.const 0) (i32.const 1) (local.get $eos)))"#;

#[tokio::test]
async fn a_buffered_body_past_the_limit_is_answered_413_or_500() {
    let wasm = module("0_2_1", &[], BUFFERING);
    let host = host();
    let plugin = load_with(&host, &wasm, |cfg| cfg.limits.body_bytes = 16);

    let mut s = plugin.stream(info()).unwrap();
    let mut chunk = Some(Bytes::from_static(b"0123456789"));
    assert!(matches!(
        s.request_body(&mut chunk, false).await,
        Verdict::Continue
    ));
    assert_eq!(chunk, None, "held by the plugin");
    let mut chunk = Some(Bytes::from_static(b"0123456789"));
    let Verdict::Local(r) = s.request_body(&mut chunk, false).await else {
        panic!("20 bytes is past the 16-byte limit");
    };
    assert_eq!((r.status, &*r.details), (413, "request_payload_too_large"));

    // Within the limit the whole body comes back at its end.
    let mut s = plugin.stream(info()).unwrap();
    let mut chunk = Some(Bytes::from_static(b"01234567"));
    let _ = s.request_body(&mut chunk, false).await;
    let mut chunk = Some(Bytes::from_static(b"89"));
    assert!(matches!(
        s.request_body(&mut chunk, true).await,
        Verdict::Continue
    ));
    assert_eq!(chunk.as_deref(), Some(&b"0123456789"[..]));

    // A response already under way cannot become a 413: 500.
    let mut s = plugin.stream(info()).unwrap();
    let mut chunk = Some(Bytes::from(vec![b'x'; 17]));
    let Verdict::Local(r) = s.response_body(&mut chunk, false).await else {
        panic!("17 bytes is past the limit");
    };
    assert_eq!((r.status, &*r.details), (500, "response_payload_too_large"));
}
