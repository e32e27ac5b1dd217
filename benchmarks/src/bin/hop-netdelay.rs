//! `hop-netdelay QUEUE DELAY_MS`: delay every packet an iptables NFQUEUE rule hands to queue
//! QUEUE by DELAY_MS milliseconds, in order, then accept it. This kernel has no netem; this is
//! the measured replacement from `../shared/notes/network-on-this-kernel.md` (section 1b): put
//! the rule on the receiving side's `raw PREROUTING` of each namespace (on OUTPUT, TCP Small
//! Queues throttles the sender), e.g.
//!
//! ```sh
//! ip netns exec A iptables -t raw -A PREROUTING -i VETH -j NFQUEUE --queue-num 0
//! ip netns exec A hop-netdelay 0 20 &
//! ```
//!
//! `scripts/netns.sh up PREFIX RATE DELAY_MS` does both sides. Packets are not copied to user
//! space (copy range 0); the netlink receive buffer is raised to 32 MiB so none are dropped at
//! 1 Gbit/s. Stops on SIGTERM/SIGINT (the kernel then accepts queued packets: fail-open).

use nfq::{Queue, Verdict};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = || -> ! {
        eprintln!("usage: hop-netdelay QUEUE DELAY_MS");
        std::process::exit(2)
    };
    let qnum: u16 = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| usage());
    let delay_ms: f64 = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| usage());
    if !(0.0..=10_000.0).contains(&delay_ms) {
        usage();
    }
    if let Err(e) = run(qnum, Duration::from_micros((delay_ms * 1000.0) as u64)) {
        eprintln!("hop-netdelay: {e}");
        std::process::exit(1);
    }
}

fn run(qnum: u16, delay: Duration) -> std::io::Result<()> {
    let mut q = Queue::open()?;
    q.bind(qnum)?;
    q.set_copy_range(qnum, 0)?;
    q.set_queue_max_len(qnum, 1 << 16)?;
    q.set_fail_open(qnum, true)?;
    q.set_nonblocking(true);
    enlarge_netlink_rcvbuf(32 << 20);
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    loop {
        loop {
            match q.recv() {
                Ok(msg) => held.push_back((Instant::now() + delay, msg)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    eprintln!("hop-netdelay: recv: {e}");
                    break;
                }
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, mut msg)) = held.pop_front() {
                msg.set_verdict(Verdict::Accept);
                if let Err(e) = q.verdict(msg) {
                    eprintln!("hop-netdelay: verdict: {e}");
                }
            }
        }
        let wait = held
            .front()
            .map(|(t, _)| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(1));
        std::thread::sleep(wait.min(Duration::from_micros(200)));
    }
}

/// nfq does not expose its socket; it is the only socket of this process, so set the option on
/// every low descriptor (failures on non-sockets are harmless).
fn enlarge_netlink_rcvbuf(bytes: i32) {
    extern "C" {
        fn setsockopt(fd: i32, level: i32, name: i32, val: *const i32, len: u32) -> i32;
    }
    for fd in 3..64 {
        // SAFETY: setsockopt(2) reads 4 bytes from `bytes`; a bad fd only returns an error.
        let _ = unsafe {
            setsockopt(
                fd, 1,  /* SOL_SOCKET */
                33, /* SO_RCVBUFFORCE */
                &bytes, 4,
            )
        };
    }
}
