//! A hostile client against a real server: crafted manifests must be refused before anything
//! is written, and nothing may land outside the server's root.

use super::client::{open, ClientSettings, RemotePath};
use super::control::{Control, Request, SyncSettings};
use super::endpoint::{Credentials, NetOptions};
use super::server::{serve, ServeSettings};
use super::wire::{expect_msg, write_msg};
use crate::id::ChunkId;
use crate::manifest::{ChunkSpec, Entry, EntryKind, Meta};
use crate::path::RelPath;
use crate::protocol::{self, Frame};
use serde::Serialize;
use std::path::Path;

fn identity() -> (Credentials, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["test".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let creds = Credentials {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    let fp = super::client::identity_fingerprint(&creds).unwrap();
    (creds, fp)
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    outside: std::path::PathBuf,
    client: ClientSettings,
    port: u16,
}

fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let (server_id, _) = identity();
    let (client_id, client_fp) = identity();
    let ak = dir.path().join("authorized_keys");
    std::fs::write(&ak, format!("{client_fp}\n")).unwrap();
    let settings = ServeSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        root: root.clone(),
        identity: server_id,
        admitted: crate::net::trust::Admitted::file(ak),
        net: NetOptions::default(),
        max_sessions: 4,
        source_cache: false,
        once: false,
        agent: None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = serve(settings, move |addr| {
            let _ = tx.send(addr.port());
        });
    });
    let port = rx.recv().unwrap();
    let client = ClientSettings {
        identity: client_id,
        known_hosts: dir.path().join("known_hosts"),
        accept_new: true,
        net: NetOptions::default(),
    };
    Fixture {
        _dir: dir,
        root,
        outside,
        client,
        port,
    }
}

fn settings() -> SyncSettings {
    SyncSettings {
        sparse: true,
        no_index_cache: true,
        streams: 2,
        delta: true,
        push: true,
        ..SyncSettings::none()
    }
}

fn entry(path: &str, kind: EntryKind) -> Entry {
    Entry {
        path: RelPath::from_bytes(path.as_bytes().to_vec()).unwrap(),
        kind,
        meta: Meta {
            mode: 0o755,
            ..Meta::default()
        },
    }
}

/// A session that pushes into `dst` under the fixture's root.
async fn push_session(f: &Fixture) -> super::client::Session {
    let remote = RemotePath {
        host: "127.0.0.1".into(),
        port: f.port,
        path: "dst".into(),
    };
    let request = Request::Push {
        path: "dst".into(),
        name_if_dir: None,
    };
    open(&remote, &f.client, request, settings()).await.unwrap()
}

/// Push `body` (already framed) as the manifest and return what the server answered.
fn push_raw(f: &Fixture, body: Vec<u8>) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut s = push_session(f).await;
        super::wire::write_raw(&mut s.ctl.send, &body)
            .await
            .unwrap();
        let notes = Control::SenderNotes {
            skipped: vec![],
            errors: vec![],
        };
        let _ = write_msg(&mut s.ctl.send, &notes).await;
        let answer = expect_msg::<Control>(&mut s.ctl.recv, "summary").await;
        s.conn.close(0u32.into(), b"done");
        match answer {
            Ok(other) => format!("{other:?}"),
            Err(e) => e.to_string(),
        }
    })
}

fn frames(entries: &[Entry]) -> Vec<u8> {
    let mut buf = Vec::new();
    for e in entries {
        protocol::encode(&Frame::Entry(e.clone()), &mut buf).unwrap();
    }
    protocol::encode(&Frame::ManifestEnd, &mut buf).unwrap();
    buf
}

fn file(data: &[u8]) -> EntryKind {
    let chunks = vec![ChunkSpec {
        len: data.len() as u32,
        id: ChunkId::of(data),
        zero: false,
    }];
    EntryKind::File {
        size: data.len() as u64,
        hash: crate::chunk::file_hash(data.len() as u64, &chunks),
        chunks,
    }
}

/// A symlink to the directory outside the fixture's root.
fn link_outside(f: &Fixture) -> EntryKind {
    EntryKind::Symlink {
        target: f.outside.as_os_str().as_encoded_bytes().to_vec(),
    }
}

fn nothing_outside(f: &Fixture) {
    assert!(
        std::fs::read_dir(&f.outside).unwrap().next().is_none(),
        "a file was written outside the root"
    );
}

#[test]
fn a_file_through_a_symlink_in_the_same_manifest_is_refused() {
    let f = start();
    let link = link_outside(&f);
    let answer = push_raw(
        &f,
        frames(&[
            entry("", EntryKind::Dir),
            entry("l", link),
            entry("l/x", file(b"escape")),
        ]),
    );
    assert!(answer.contains("malformed manifest"), "{answer}");
    nothing_outside(&f);
    assert!(
        !f.root.join("dst/l").exists(),
        "applied part of a refused manifest"
    );
}

#[test]
fn a_file_through_a_symlink_left_by_an_earlier_sync_is_refused() {
    let f = start();
    // First sync: a legitimate symlink pointing out of the root.
    let link = link_outside(&f);
    let answer = push_raw(&f, frames(&[entry("", EntryKind::Dir), entry("l", link)]));
    assert!(answer.contains("Summary"), "{answer}");
    assert!(std::fs::symlink_metadata(f.root.join("dst/l"))
        .unwrap()
        .is_symlink());
    // Second sync: a file under it, without listing the directory.
    let answer = push_raw(
        &f,
        frames(&[entry("", EntryKind::Dir), entry("l/x", file(b"escape"))]),
    );
    assert!(answer.contains("malformed manifest"), "{answer}");
    nothing_outside(&f);
}

#[test]
fn dot_dot_and_absolute_paths_are_refused_on_decode() {
    #[derive(Serialize)]
    struct EvilEntry {
        path: Vec<u8>,
        kind: EntryKind,
        meta: Meta,
    }
    #[derive(Serialize)]
    enum EvilFrame {
        Entry(EvilEntry),
    }
    let f = start();
    for path in [
        b"../x".to_vec(),
        f.outside.join("x").as_os_str().as_encoded_bytes().to_vec(),
    ] {
        let mut body = frames(&[entry("", EntryKind::Dir)]);
        body.truncate(body.len() - 5); // drop ManifestEnd (4-byte length + 1 byte)
        let evil = EvilFrame::Entry(EvilEntry {
            path,
            kind: file(b"escape"),
            meta: Meta::default(),
        });
        protocol::encode_msg(&evil, &mut body).unwrap();
        protocol::encode(&Frame::ManifestEnd, &mut body).unwrap();
        let answer = push_raw(&f, body);
        assert!(answer.contains("unsafe path"), "{answer}");
    }
    nothing_outside(&f);
    assert!(!Path::new(&f.root.join("x")).exists());
}

#[test]
fn a_chunk_corrupted_by_the_sender_is_detected_and_never_written() {
    let f = start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = rt.block_on(async {
        let mut s = push_session(&f).await;
        // A hostile sender: every want-list is answered with bytes that are not the chunk.
        let conn = s.conn.clone();
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    while let Ok(Some(Frame::Want { entry, runs, .. })) =
                        super::wire::read_msg::<Frame>(&mut recv).await
                    {
                        for n in protocol::from_runs(&runs, 16).unwrap() {
                            let bad = Frame::Data {
                                entry,
                                chunk: n,
                                codec: protocol::Codec::Raw,
                                bytes: b"forged".to_vec(),
                            };
                            let _ = write_msg(&mut send, &bad).await;
                        }
                    }
                    let _ = send.finish();
                });
            }
        });
        let body = frames(&[entry("", EntryKind::Dir), entry("f", file(b"honest"))]);
        super::wire::write_raw(&mut s.ctl.send, &body)
            .await
            .unwrap();
        let notes = Control::SenderNotes {
            skipped: vec![],
            errors: vec![],
        };
        write_msg(&mut s.ctl.send, &notes).await.unwrap();
        let answer = expect_msg::<Control>(&mut s.ctl.recv, "summary").await;
        s.conn.close(0u32.into(), b"done");
        format!("{answer:?}")
    });
    assert!(answer.contains("integrity check failed"), "{answer}");
    assert!(!f.root.join("dst/f").exists(), "a forged chunk was written");
    let leftovers: Vec<_> = std::fs::read_dir(f.root.join("dst"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_link_carries_requests_one_after_another_and_a_refused_pipelined_push_says_why() {
    let f = start();
    let remote = RemotePath::parse(&format!("quic://127.0.0.1:{}/", f.port))
        .unwrap()
        .unwrap();
    let mut link = super::client::Link::connect(&remote, &f.client).unwrap();
    // The first request settles the keys; this server has no agent and says so.
    let e = link.call("{}").unwrap_err().to_string();
    assert!(e.contains("runs no agent"), "{e}");
    let src = f._dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), vec![7u8; 300_000]).unwrap();
    // Pushes after the first request do not wait for the server's answer.
    let r = link.push(&src, "one", settings(), None, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        std::fs::read(f.root.join("one/a")).unwrap(),
        vec![7u8; 300_000]
    );
    let e = link
        .push(&src, "../escape", settings(), None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("refused") && e.contains(".."), "{e}");
    nothing_outside(&f);
    assert!(!f._dir.path().join("escape").exists());
}

/// Pseudo-random bytes (xorshift), so that no two pages are alike.
fn pages(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n * 4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A sender that keeps the round the receiver holds (a migration's pre-copy) pushes the chunks
/// the receiver lacks without waiting for want-lists, and the receiver uses them all; when
/// the receiver's copy is not what the sender believes, files fall back to want-lists, and the
/// result is byte-identical either way.
#[test]
fn a_sender_that_knows_the_receivers_tree_pushes_what_it_lacks() {
    let f = start();
    let remote = RemotePath::parse(&format!("quic://127.0.0.1:{}/", f.port))
        .unwrap()
        .unwrap();
    let base = f._dir.path();
    let (r1, r2) = (base.join("round-1"), base.join("round-2"));
    std::fs::create_dir_all(&r1).unwrap();
    std::fs::write(r1.join("pages-1.img"), pages(1, 512)).unwrap();
    std::fs::write(r1.join("core-1.img"), b"core one").unwrap();
    let mut link = super::client::Link::connect(&remote, &f.client).unwrap();
    let s = SyncSettings {
        params: crate::chunk::ChunkParams::default().with_pages(true),
        delete: true,
        ..settings()
    };
    let r = link.push(&r1, "images", s.clone(), None, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.stats.chunks_pushed, 0, "nothing to push without a basis");

    // Round 2: 40 pages rewritten, a new file, a changed small file.
    let mut p2 = pages(1, 512);
    for k in (0..40).map(|i| i * 12 + 3) {
        p2[k * 4096..(k + 1) * 4096].copy_from_slice(&pages(100 + k as u64, 1));
    }
    std::fs::create_dir_all(&r2).unwrap();
    std::fs::write(r2.join("pages-1.img"), &p2).unwrap();
    std::fs::write(r2.join("core-1.img"), b"core two").unwrap();
    std::fs::write(r2.join("pages-2.img"), pages(7, 3)).unwrap();
    let r = link
        .push(&r2, "images", s.clone(), None, Some(r1.clone()))
        .unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    for name in ["pages-1.img", "core-1.img", "pages-2.img"] {
        assert_eq!(
            std::fs::read(f.root.join("images").join(name)).unwrap(),
            std::fs::read(r2.join(name)).unwrap(),
            "{name}"
        );
    }
    // 40 pages + core + 3 new pages, all from the push.
    assert_eq!(r.stats.chunks_pushed, 44, "{:?}", r.stats);

    // The receiver's copy is not round 2 (someone changed a page there): the sender's belief
    // is wrong for that file, which is fetched the usual way; the result is still exact.
    let mut held = std::fs::read(f.root.join("images/pages-1.img")).unwrap();
    held[100 * 4096..101 * 4096].copy_from_slice(&pages(999, 1));
    std::fs::write(f.root.join("images/pages-1.img"), &held).unwrap();
    let r3 = base.join("round-3");
    std::fs::create_dir_all(&r3).unwrap();
    let mut p3 = p2.clone();
    p3[7 * 4096..8 * 4096].copy_from_slice(&pages(5000, 1));
    std::fs::write(r3.join("pages-1.img"), &p3).unwrap();
    std::fs::write(r3.join("core-1.img"), b"core two").unwrap();
    let r = link.push(&r3, "images", s, None, Some(r2)).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        std::fs::read(f.root.join("images/pages-1.img")).unwrap(),
        p3
    );
    assert!(!f.root.join("images/pages-2.img").exists(), "--delete");
    assert_eq!(
        r.stats.chunks_pushed, 0,
        "a file whose plan wants more than was pushed is fetched as usual"
    );
    // ...and only its two pages that differ cross, not the whole file again.
    assert_eq!(r.stats.bytes_literal, 2 * 4096, "{:?}", r.stats);
    link.close();
}

/// With compression on, a lane's parts travel on all its streams but compress as one zstd
/// stream with a large window: what repeats between files far apart in the lane is sent once per
/// lane, and every part decodes on its lane (none is fetched apart).
#[test]
fn a_lane_compresses_as_one_stream_over_its_streams() {
    let f = start();
    let remote = RemotePath::parse(&format!("quic://127.0.0.1:{}/", f.port))
        .unwrap()
        .unwrap();
    let src = f._dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // 64 files of 320 KiB: the same 256 KiB of noise, one byte in every 4 KiB changed per file
    // (so no chunk repeats), then 64 KiB of each file's own noise. 20 MiB in all, 4 MiB unique:
    // the lanes' 16 streams each get runs of 1 MiB in turn.
    let shared = pages(1, 64);
    let mut total = 0usize;
    for i in 0..64u64 {
        let mut data = shared.clone();
        for k in (0..data.len()).step_by(4096) {
            data[k] ^= (i + 1) as u8;
        }
        data.extend_from_slice(&pages(1000 + i, 16));
        total += data.len();
        std::fs::write(src.join(format!("f{i:02}")), &data).unwrap();
    }
    let mut link = super::client::Link::connect(&remote, &f.client).unwrap();
    let s = SyncSettings {
        compress: Some(1),
        ..settings()
    };
    let r = link.push(&src, "lanes", s, None, None).unwrap();
    link.close();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    for i in 0..64 {
        let name = format!("f{i:02}");
        assert_eq!(
            std::fs::read(f.root.join("lanes").join(&name)).unwrap(),
            std::fs::read(src.join(&name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(r.stats.fetches_alone, 0, "{:?}", r.stats);
    // 4 MiB unique plus the shared part once per lane (2 lanes), and overhead; a stream per
    // QUIC stream would send the shared part once per stream (16 of them): 8 MiB.
    let unique = 64 * 64 * 1024;
    assert!(
        r.stats.bytes_wire < unique + 6 * shared.len() as u64,
        "{} bytes on the wire for {total} ({unique} unique)",
        r.stats.bytes_wire
    );
}

/// A file with more chunks than one frame can list goes in parts, both ways.
#[test]
fn a_chunk_list_longer_than_a_frame_goes_in_parts_both_ways() {
    let f = start();
    let remote = |path: &str| RemotePath {
        host: "127.0.0.1".into(),
        port: f.port,
        path: path.into(),
    };
    let src = f._dir.path().join("big");
    std::fs::create_dir_all(&src).unwrap();
    // The smallest chunks there are (256 B to 1 KiB): 96 MiB make more than one part's worth.
    let data = pages(3, 24_576);
    std::fs::write(src.join("f"), &data).unwrap();
    let s = SyncSettings {
        params: crate::chunk::ChunkParams::new(256, 256, 1024).unwrap(),
        ..settings()
    };
    let progress = std::sync::Arc::new(crate::report::Progress::default());
    // The first push reads the file, so its list goes while it is cut (in windows); the second,
    // into an empty destination again, takes the list from the sender's cache and sends it in
    // parts of at most LIST_PART chunks.
    let cache = f._dir.path().join("src.hopidx");
    for round in 0..2 {
        let r = super::client::push(
            &src,
            &remote("big"),
            s.clone(),
            Some(cache.clone()),
            None,
            &f.client,
            progress.clone(),
        )
        .unwrap();
        assert!(r.errors.is_empty(), "round {round}: {:?}", r.errors);
        assert_eq!(std::fs::read(f.root.join("big/f")).unwrap(), data);
        assert!(cache.exists());
        // Read in the first round: the receiver wrote it while its list still arrived.
        assert_eq!(
            r.stats.files_streamed,
            u64::from(round == 0),
            "round {round}"
        );
        std::fs::remove_dir_all(f.root.join("big")).unwrap();
    }
    std::fs::create_dir_all(f.root.join("big")).unwrap();
    std::fs::write(f.root.join("big/f"), &data).unwrap();
    let back = f._dir.path().join("back");
    let ropts = crate::receiver::ReceiverOptions {
        params: s.params,
        no_index_cache: true,
        ..Default::default()
    };
    let r = super::client::pull(&remote("big/"), &back, s, ropts, &f.client, progress).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(std::fs::read(back.join("f")).unwrap(), data);
    assert_eq!(r.stats.files_streamed, 1, "{:?}", r.stats);
}

mod trees {
    //! Arbitrary trees and their replacements round-trip byte-identically through a remote
    //! push (and a local sync), entry kinds changing at the same names included.
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    #[derive(Clone, Debug)]
    pub enum Node {
        File {
            seed: u64,
            len: usize,
            private: bool,
        },
        Link(u8),
        Dir(BTreeMap<String, Node>),
    }

    fn node() -> impl Strategy<Value = Node> {
        let leaf = prop_oneof![
            (any::<u64>(), 0usize..70_000, any::<bool>())
                .prop_map(|(seed, len, private)| Node::File { seed, len, private }),
            any::<u8>().prop_map(Node::Link),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop::collection::btree_map("[a-d]", inner, 0..4).prop_map(Node::Dir)
        })
    }

    pub fn tree() -> impl Strategy<Value = BTreeMap<String, Node>> {
        prop::collection::btree_map("[a-e]", node(), 0..5)
    }

    pub fn make(dir: &Path, t: &BTreeMap<String, Node>) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, n) in t {
            let p = dir.join(name);
            match n {
                Node::File { seed, len, private } => {
                    std::fs::write(&p, noise(*seed, *len)).unwrap();
                    let mode = if *private { 0o600 } else { 0o644 };
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
                }
                Node::Link(t) => std::os::unix::fs::symlink(format!("target-{t}"), &p).unwrap(),
                Node::Dir(sub) => make(&p, sub),
            }
        }
    }

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        crate::chunk::tests_support::noise(seed, len)
    }

    /// Every entry under `root`: path, kind, content or target, permission bits.
    pub fn describe(root: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let md = std::fs::symlink_metadata(&p).unwrap();
                let what = if md.is_symlink() {
                    format!("link {:?}", std::fs::read_link(&p).unwrap())
                } else if md.is_dir() {
                    stack.push(p.clone());
                    "dir".to_string()
                } else {
                    let data = std::fs::read(&p).unwrap();
                    format!(
                        "file {:o} {} {}",
                        md.permissions().mode() & 0o7777,
                        data.len(),
                        blake3::hash(&data)
                    )
                };
                out.push((rel, what));
            }
        }
        out.sort();
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn arbitrary_trees_round_trip_remotely_and_locally(a in tree(), b in tree()) {
            let f = start();
            let remote = RemotePath::parse(&format!("quic://127.0.0.1:{}/", f.port)).unwrap().unwrap();
            let mut link = super::super::client::Link::connect(&remote, &f.client).unwrap();
            let base = f._dir.path();
            let local_dst = base.join("local-dst");
            let s = SyncSettings { delete: true, ..settings() };
            for (round, t) in [&a, &b].into_iter().enumerate() {
                let src = base.join(format!("src-{round}"));
                make(&src, t);
                let r = link.push(&src, "t", s.clone(), None, None).unwrap();
                prop_assert!(r.errors.is_empty(), "{:?}", r.errors);
                prop_assert_eq!(describe(&src), describe(&f.root.join("t")), "remote, round {}", round);
                let sopts = crate::sender::SenderOptions::default();
                let ropts = crate::receiver::ReceiverOptions { delete: true, ..Default::default() };
                let r = crate::local::sync_local(&src, &local_dst, None, sopts, ropts, &Default::default()).unwrap();
                prop_assert!(r.errors.is_empty(), "{:?}", r.errors);
                prop_assert_eq!(describe(&src), describe(&local_dst), "local, round {}", round);
            }
            link.close();
        }
    }
}
