//! Throughput of the engine's inner loops, in bytes per second: chunking (FastCDC cut points),
//! chunk hashing (BLAKE3), chunk + hash together, planning and zstd payload compression.
//!
//! `cargo bench -p hop-benchmarks` (release build). Inputs are deterministic pseudo-random bytes
//! (incompressible, like the memory pages of a checkpoint) generated in memory.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hop_engine::chunk::{chunk_bytes, cut_points, ChunkParams};
use hop_engine::index::ChunkIndex;
use hop_engine::plan::plan_file;

fn noise(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    blake3::Hasher::new()
        .update(b"bench")
        .finalize_xof()
        .fill(&mut v);
    v
}

/// 24 MiB: below the parallel threshold, so the one-core groups measure the fused pass that
/// every file under 32 MiB takes; `chunk_and_hash_all_cores` uses 256 MiB.
const LEN: usize = 24 << 20;
const BIG: usize = 256 << 20;

fn params() -> Vec<(&'static str, ChunkParams)> {
    vec![
        ("default-4k", ChunkParams::default()),
        ("avg16k", ChunkParams::new(8192, 16384, 131072).unwrap()),
        ("avg64k", ChunkParams::new(16384, 65536, 262144).unwrap()),
    ]
}

fn one_core<R>(f: impl FnOnce() -> R + Send) -> R
where
    R: Send,
{
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(f)
}

/// One benchmark group over `LEN` bytes, one entry per chunk-size setting, run on one core.
fn per_params_1core(c: &mut Criterion, group: &str, f: impl Fn(ChunkParams) + Sync) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(LEN as u64)).sample_size(10);
    for (name, p) in params() {
        g.bench_with_input(BenchmarkId::from_parameter(name), &p, |b, p| {
            b.iter(|| one_core(|| f(*p)))
        });
    }
    g.finish();
}

fn chunking(c: &mut Criterion) {
    let data = noise(LEN);
    per_params_1core(c, "cut_points_1core", |p| {
        black_box(cut_points(black_box(&data), p));
    });
    per_params_1core(c, "chunk_and_hash_1core", |p| {
        black_box(chunk_bytes(black_box(&data), p));
    });

    // Cut + chunk ids only (no whole-file hash): the part of the work the receiver's lookup needs.
    let mut g = c.benchmark_group("cut_and_ids_1core");
    g.throughput(Throughput::Bytes(LEN as u64)).sample_size(10);
    let p = ChunkParams::default();
    g.bench_function("default-4k", |b| {
        b.iter(|| {
            fastcdc::v2020::FastCDC::new(black_box(&data), p.min, p.avg, p.max)
                .map(|c| blake3::hash(&data[c.offset..c.offset + c.length]))
                .collect::<Vec<_>>()
        })
    });
    g.finish();

    let big = noise(BIG);
    let mut g = c.benchmark_group("chunk_and_hash_all_cores");
    g.throughput(Throughput::Bytes(BIG as u64)).sample_size(10);
    let p = ChunkParams::default();
    g.bench_function("default-4k", |b| b.iter(|| chunk_bytes(black_box(&big), p)));
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let data = noise(LEN);
    let mut g = c.benchmark_group("blake3_per_chunk_1core");
    g.throughput(Throughput::Bytes(LEN as u64)).sample_size(10);
    for size in [4096usize, 16384, 65536] {
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter(|| {
                for c in data.chunks(size) {
                    black_box(blake3::hash(c));
                }
            })
        });
    }
    g.finish();
}

fn planning(c: &mut Criterion) {
    let p = ChunkParams::default();
    let old = noise(LEN);
    let mut new = old.clone();
    for i in (0..LEN).step_by(400_000) {
        new[i] ^= 0xff;
    }
    let mut idx = ChunkIndex::default();
    idx.add("/old".into(), chunk_bytes(&old, p));
    let fc = chunk_bytes(&new, p);
    let mut g = c.benchmark_group("plan");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.bench_function("default-4k", |b| {
        b.iter(|| plan_file(black_box(&fc.chunks), &idx))
    });
    g.finish();
}

fn compression(c: &mut Criterion) {
    let text: Vec<u8> = b"key:000000000042 value {\"name\":\"alpha\",\"n\":12345} "
        .iter()
        .cycle()
        .take(4 << 20)
        .copied()
        .collect();
    let mut g = c.benchmark_group("zstd_payload_16k");
    g.throughput(Throughput::Bytes(text.len() as u64))
        .sample_size(10);
    for level in [1, 3] {
        g.bench_with_input(BenchmarkId::from_parameter(level), &level, |b, &level| {
            b.iter(|| {
                for c in text.chunks(16384) {
                    black_box(hop_engine::sender::encode_payload(c.to_vec(), Some(level)));
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, chunking, hashing, planning, compression);
criterion_main!(benches);
