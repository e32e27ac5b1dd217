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
        authorized_keys: ak,
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
