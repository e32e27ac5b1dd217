//! The first message of every request (`Control::Hello`: version, request, settings) and the
//! server's checks of it against its root, as `hop serve` runs them before anything else.
#![no_main]

use hop_engine::net::control::Control;
use hop_engine::net::server::check_request;
use hop_engine::protocol::decode_msg;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn root() -> &'static std::path::Path {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    ROOT.get_or_init(|| {
        let d = tempfile::tempdir().expect("temporary directory");
        std::fs::create_dir(d.path().join("dir")).expect("mkdir");
        std::fs::write(d.path().join("file"), b"x").expect("write");
        d
    })
    .path()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Control::Hello {
        request, settings, ..
    }) = decode_msg::<Control>(data)
    {
        if let Ok((path, _)) = check_request(root(), &request, &settings) {
            // Whatever the request said, what it names lies under the root.
            assert!(path.starts_with(root()), "{path:?} escapes the root");
        }
    }
});
