//! The cost of finding a request's model: the proxy's scanner (`model::request_model`) beside
//! serde_json's reading of the same body (`model::serde_model`, what the proxy did before and
//! the definition the scanner keeps), in the same run (STYLE.md habit 11).
//!
//! Why: every request with a JSON body is read for its model before it is admitted, and a
//! chat request's body is mostly its prompt, so the cost per byte of a skipped string counts
//! as much as the fixed cost of a small body.
//!
//! Bodies: the e2e bench's 118-byte request; a 4 KiB and a 64 KiB chat whose prompt has
//! escapes (`\n`, `\"`) and non-ASCII text, the model last.
//!
//! Run: `cargo bench --bench model`.

use std::hint::black_box;

use chutes_proxy::model::{request_model, serde_model};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SMALL: &str = r#"{"model":"bench/model","messages":[{"role":"user","content":"Say hello in five words."}],"max_tokens":16,"stream":false}"#;

/// A chat request of about `size` bytes: system and user turns, the model last.
fn chat(size: usize) -> String {
    let line = r#"Line of the prompt: \"quoted\", a tab\t, café, 模型.\n"#;
    let prompt = line.repeat(size / line.len() + 1);
    format!(
        r#"{{"messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":"{prompt}"}}],"temperature":0.7,"max_tokens":512,"stream":true,"model":"deepseek-ai/DeepSeek-V3-0324"}}"#
    )
}

fn bench(c: &mut Criterion) {
    let bodies = [
        ("118 B", SMALL.to_string()),
        ("4 KiB", chat(4 << 10)),
        ("64 KiB", chat(64 << 10)),
    ];
    let mut g = c.benchmark_group("request_model");
    for (label, body) in &bodies {
        assert_eq!(request_model(body.as_bytes()), serde_model(body.as_bytes()));
        assert!(request_model(body.as_bytes()).is_some(), "{label}");
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("scanner", label), body, |b, body| {
            b.iter(|| request_model(black_box(body.as_bytes())))
        });
        g.bench_with_input(BenchmarkId::new("serde_json", label), body, |b, body| {
            b.iter(|| serde_model(black_box(body.as_bytes())))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
