//! The change feed through real mounts (issue 10): another client's rename, create, delete
//! and overwrite reach this client's kernel well within the long TTL, and a restarted
//! directory makes the client drop what it holds and subscribe again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dfs_tests::*;

/// The long TTL the client gives the kernel while the feed is healthy (`fs::feed::FEED_TTL`).
const FEED_TTL: Duration = Duration::from_secs(15);

/// How long a change may take to show at the other client in these tests: far below the TTL,
/// so only the feed can explain it.
const DELIVERY: Duration = Duration::from_secs(2);

/// The short TTL (`fs::ATTR_TTL`, 1 s), with a margin: the kernel answering a name itself for
/// longer than this shows the long TTL is in force.
const PAST_SHORT_TTL: Duration = Duration::from_millis(1500);

pub(crate) fn metrics(port: u16) -> HashMap<String, f64> {
    parse_metrics(&http_get_text(&format!("http://127.0.0.1:{port}/metrics")))
}

pub(crate) fn feed_up(port: u16) -> bool {
    metrics(port).get("dfs_client_feed_up_total") == Some(&1.0)
}

fn resyncs(port: u16) -> f64 {
    metrics(port)
        .get("dfs_client_feed_resyncs_total")
        .copied()
        .unwrap_or(0.0)
}

/// Lookups and getattrs that reached the client (not answered from the kernel's cache).
pub(crate) fn kernel_misses(port: u16) -> f64 {
    metrics(port)
        .iter()
        .filter(|(k, _)| {
            k.starts_with("dfs_latency_seconds_count{")
                && k.contains("kind=\"fuse_op\"")
                && (k.contains("name=\"lookup\"") || k.contains("name=\"getattr\""))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Stats `paths` in `m` until its kernel has answered them all itself (no lookup or getattr
/// reached the client) for longer than the short TTL: the long TTL is in force. Bounded.
/// `populated` is a time before the command that made the kernel look them up. Returns a time
/// no later than the kernel's last refresh of them: its entries last at least until that time
/// plus `FEED_TTL`.
pub(crate) fn kernel_holds_long(
    m: &Mount,
    port: u16,
    paths: &[&str],
    populated: Instant,
) -> Instant {
    let start = Instant::now();
    // No miss while polling: the last refresh was the populating command's.
    let mut refreshed = populated;
    let mut misses = kernel_misses(port);
    loop {
        let round = Instant::now();
        for p in paths {
            std::fs::symlink_metadata(m.path(p)).unwrap();
        }
        let now = kernel_misses(port);
        if now != misses {
            misses = now;
            refreshed = round;
        } else if refreshed.elapsed() > PAST_SHORT_TTL {
            return refreshed;
        }
        assert!(
            start.elapsed() < FEED_TTL,
            "the kernel never held {paths:?} past the short TTL: {}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `seen` (a change showed at B) happened before B's kernel could have dropped what it held
/// by its TTL: only an invalidation (the feed's, a resync's or its own) explains it.
pub(crate) fn only_an_invalidation_explains(refreshed: Instant, seen: Instant) {
    assert!(
        seen.duration_since(refreshed) < FEED_TTL,
        "inconclusive: {:?} since B's kernel last refreshed, past the long TTL",
        seen.duration_since(refreshed)
    );
}

pub(crate) fn mount_with_metrics(c: &Client) -> (Mount, u16) {
    let port = free_port();
    let m = c.mount(&["--metrics", &format!("127.0.0.1:{port}")]);
    assert!(
        eventually(Duration::from_secs(10), || feed_up(port)),
        "the change feed never came up: {}",
        m.log()
    );
    (m, port)
}

#[test]
fn another_clients_rename_create_delete_and_overwrite_show_well_within_the_ttl() {
    let cluster = Cluster::start(&[]);
    let (a, b) = (Client::new(&cluster.url), Client::new(&cluster.url));
    a.signup_login("alice");
    b.signup_login("alice");
    let ma = a.mount(&[]);
    let (mb, port) = mount_with_metrics(&b);
    ok(ma.sh("mkdir d && echo one > d/a && echo bee > d/b && echo short > d/c"));
    // B's kernel holds the entries and attributes, and B knows `d` completely.
    let populated = Instant::now();
    ok(mb.sh("ls -l d >/dev/null && stat d/a d/b d/c >/dev/null && cat d/a d/b d/c >/dev/null"));
    assert!(mb.path("d/new").symlink_metadata().is_err());
    // B's kernel answers them itself past the short TTL: the long TTL is in force (so what
    // follows cannot be the short TTL's doing). Answers given while A's own changes were
    // still arriving got the short TTL; those are asked again until they hold.
    let refreshed = kernel_holds_long(&mb, port, &["d", "d/a", "d/b", "d/c"], populated);

    ok(ma.sh("mv d/a d/a2 && echo fresh > d/new && rm d/b && echo 'a much longer content' > d/c"));
    let seen = eventually(DELIVERY, || {
        mb.path("d/a").symlink_metadata().is_err()
            && mb.path("d/a2").exists()
            && mb.path("d/new").exists()
            && mb.path("d/b").symlink_metadata().is_err()
            && std::fs::metadata(mb.path("d/c")).is_ok_and(|m| m.len() == 22)
    });
    assert!(
        seen,
        "B's kernel still shows the old namespace {DELIVERY:?} after A's change"
    );
    only_an_invalidation_explains(refreshed, Instant::now());
    assert_eq!(ok(mb.sh("ls d")), "a2\nc\nnew\n");
    assert_eq!(
        ok(mb.sh("cat d/c d/a2 d/new")),
        "a much longer content\none\nfresh\n"
    );
}

/// Sends `signal` (`-STOP`, `-CONT`) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let st = std::process::Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "kill {signal} {pid}");
}

#[test]
fn a_restarted_directory_makes_the_client_resync_and_nothing_stale_survives() {
    let mut cluster = SplitCluster::start(1);
    let (a, b) = (Client::new(&cluster.url), Client::new(&cluster.url));
    a.signup_login("alice");
    b.signup_login("alice");
    let ma = a.mount(&[]);
    let (mb, port) = mount_with_metrics(&b);
    ok(ma.sh("echo one > r.txt"));
    let populated = Instant::now();
    ok(mb.sh("cat r.txt >/dev/null && stat r.txt >/dev/null"));
    // As above: B's kernel holds r.txt's attributes with the long TTL.
    let refreshed = kernel_holds_long(&mb, port, &["r.txt"], populated);
    assert_eq!(std::fs::metadata(mb.path("r.txt")).unwrap().len(), 4);
    let before = resyncs(port);

    // B sleeps through a directory restart and a change made in the new directory's feed
    // before B subscribes to it: no change event will ever tell B; only the resync can.
    signal(mb.pid(), "-STOP");
    cluster.stop_service("directory", true);
    cluster.start_service("directory");
    cluster.wait_ready();
    let wrote = eventually(Duration::from_secs(20), || {
        ma.sh("echo 'two, and longer' > r.txt").status.success()
    });
    signal(mb.pid(), "-CONT");
    assert!(wrote, "A writes again after the restart");

    let seen = eventually(DELIVERY, || {
        std::fs::metadata(mb.path("r.txt")).is_ok_and(|m| m.len() == 16)
    });
    assert!(
        seen,
        "B's kernel still holds the size from before the restart {DELIVERY:?} after B woke"
    );
    only_an_invalidation_explains(refreshed, Instant::now());
    assert_eq!(ok(mb.sh("cat r.txt")), "two, and longer\n");
    assert!(
        resyncs(port) >= before + 1.0,
        "B dropped what it held when the feed was lost"
    );
    assert!(
        eventually(Duration::from_secs(20), || feed_up(port)),
        "B subscribed to the new directory's feed: {}",
        mb.log()
    );
}

/// A loopback proxy in front of the directory that, while `lose` is set, passes a namespace
/// change (a request carrying a request id) on to the directory and, once it answers, drops
/// the connection instead of passing the answer back: the directory applied the change, the
/// client heard nothing (its retries, with the same request id, fare the same).
struct AnswerLosingProxy {
    url: String,
    lose: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl AnswerLosingProxy {
    fn start(directory_url: &str) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let upstream = directory_url.trim_start_matches("http://").to_owned();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let lose = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (losing, stopping) = (lose.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { break };
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                let swallow = Arc::new(AtomicBool::new(false));
                let (swallowing, losing) = (swallow.clone(), losing.clone());
                pump(&client, &server, move |chunk| {
                    let id = b"x-dfs-request-id";
                    let change = chunk.windows(id.len()).any(|w| w.eq_ignore_ascii_case(id));
                    if change && losing.load(Ordering::SeqCst) {
                        swallowing.store(true, Ordering::SeqCst);
                    }
                    true
                });
                // Once the directory answered a change, the client never hears it.
                pump(&server, &client, move |_| !swallow.load(Ordering::SeqCst));
            }
        });
        AnswerLosingProxy { url, lose, stop }
    }

    fn lose_answers(&self, lose: bool) {
        self.lose.store(lose, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies what `from` sends to `to`, on a thread of its own, until either ends or `pass`
/// refuses a chunk; then closes both.
fn pump(
    from: &std::net::TcpStream,
    to: &std::net::TcpStream,
    mut pass: impl FnMut(&[u8]) -> bool + Send + 'static,
) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match std::io::Read::read(&mut from, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !pass(&buf[..n]) || std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}

impl Drop for AnswerLosingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop up so that it sees the stop.
        let _ = std::net::TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

#[test]
fn a_clients_own_unlink_that_got_no_answer_leaves_no_stale_entry_in_its_kernel() {
    let cluster = Cluster::start(&[]);
    let (a, mut b) = (Client::new(&cluster.url), Client::new(&cluster.url));
    a.signup_login("alice");
    b.signup_login("alice");
    let proxy = AnswerLosingProxy::start(&cluster.url);
    b.server = proxy.url.clone();
    let ma = a.mount(&[]);
    let port = free_port();
    let mb = b.mount(&[
        "--metrics",
        &format!("127.0.0.1:{port}"),
        "--op-timeout-secs",
        "1",
    ]);
    assert!(
        eventually(Duration::from_secs(10), || feed_up(port)),
        "the change feed never came up: {}",
        mb.log()
    );
    ok(ma.sh("echo one > f"));
    let populated = Instant::now();
    ok(mb.sh("cat f >/dev/null"));
    let refreshed = kernel_holds_long(&mb, port, &["f"], populated);

    // B's rm reaches the directory, which applies it; the answer never reaches B.
    proxy.lose_answers(true);
    let out = mb.sh("rm f");
    proxy.lose_answers(false);
    assert!(!out.status.success(), "the rm got no answer: {out:?}");
    assert!(
        eventually(DELIVERY, || ma.path("f").symlink_metadata().is_err()),
        "the directory applied it (A heard it through its feed)"
    );
    // B's own change never comes back in its feed: B drops the name from its kernel itself.
    let gone = eventually(DELIVERY, || mb.path("f").symlink_metadata().is_err());
    assert!(gone, "B's kernel still shows f: {}", mb.log());
    only_an_invalidation_explains(refreshed, Instant::now());
}
