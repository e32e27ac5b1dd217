#!/usr/bin/env python3
"""The seed paper's experiment (INFOCOM'20, Table III), reproduced on network namespaces.

Run through scripts/paper-experiment.sh, which builds hop and the container image first.

Two sites, pe-a (10.77.0.1) and pe-b (10.77.0.2), joined by a veth capped at --rate with --rtt
ms of round-trip time (scripts/netns.sh); a client site pe-c (10.78.0.2) behind pe-a, where
HAProxy 2.6 listens (10.78.0.1:8000) and holds requests during a move (scripts/haproxy/hold.lua);
a WireGuard tunnel between the sites set up by `hop vpn up` (10.200.0.1 and 10.200.0.2), over
which HAProxy reaches the web server once it runs at pe-b. The application is the paper's:
WordPress (Apache 2.4 prefork + mod_php) in one runc container and MariaDB in another, both in
their site's network namespace (WordPress reaches the database on 127.0.0.1), both from a
Debian bookworm image built by scripts/paper-rootfs.sh. The image is present at both sites, as
the paper creates the target's resources from the container image before migrating; what moves
is each container's state: its memory (CRIU), MariaDB's datadir and WordPress's wp-content
(inside the bundles, synced by hop).

Each run: siege drives N concurrent clients at the front page through HAProxy (N = 0, 1, 5,
10, 50), and a writer posts a WordPress comment every 200 ms; after a few seconds of load,
`hop migrate --group` moves db and web together to the other site (a -> b, then b -> a, ...),
with the clients held at HAProxy. Afterwards: every request's outcome (siege's failed
transactions and longest transaction, the writer's), every acknowledged comment present in the
database at the new site, the front page served from there. Output: Table III's columns per
scenario (medians over --reps runs) next to the paper's figures, as Markdown, JSON and a PNG.
"""
import argparse, http.client, json, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOP = os.path.join(ROOT, "target", "release", "hop")
PLOT = os.path.join(ROOT, "target", "release", "hop-plot")
SITE = {"a": "10.77.0.1", "b": "10.77.0.2"}
VPN = {"a": "10.200.0.1", "b": "10.200.0.2"}
FRONT = "10.78.0.1"
CLIENT = "10.78.0.2"
PREFIX = "pe"
DB_PASSWORD = "hop-paper-experiment"

# The paper's Table III (GCP target; 0c also on Azure): seconds.
PAPER = {
    0: dict(pre_dump=0.327, pre_copy=4.487, checkpoint=0.613, diff=0.350, transfer=0.717, restore=5.867, downtime=7.547, total=12.361),
    1: dict(pre_dump=0.310, pre_copy=4.33, checkpoint=0.633, diff=0.380, transfer=3.420, restore=5.470, downtime=9.903, total=14.543),
    5: dict(pre_dump=0.433, pre_copy=4.953, checkpoint=0.713, diff=0.357, transfer=4.227, restore=5.347, downtime=10.643, total=16.030),
    10: dict(pre_dump=0.590, pre_copy=6.133, checkpoint=0.907, diff=0.383, transfer=4.673, restore=5.3, downtime=11.317, total=18.040),
    50: dict(pre_dump=1.170, pre_copy=7.033, checkpoint=1.917, diff=0.376, transfer=12.710, restore=5.630, downtime=20.633, total=28.836),
}


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def enter(side):
    """Only the network namespace (ip netns exec would add a mount namespace for CRIU to dump)."""
    return ["nsenter", f"--net=/run/netns/{PREFIX}-{side}"]


def wait_port(side, host, port, limit=30):
    t0 = time.time()
    while time.time() - t0 < limit:
        r = subprocess.run(enter(side) + [sys.executable, "-c",
                           f"import socket; socket.create_connection(('{host}', {port}), 1)"],
                           capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    sys.exit(f"nothing listens on {host}:{port} in site {side}")


# ---- run inside the client namespace (this script re-invoked) ----

def cmd_write(a):
    """Post a comment every --every s through HAProxy until --stop exists; one line per comment:
    'ok ID' (acknowledged: a redirect to #comment-ID) or 'fail WHY'."""
    out = open(a.out, "w", buffering=1)
    n = 0
    while not os.path.exists(a.stop):
        n += 1
        t0 = time.time()
        body = (f"comment_post_ID=1&author=writer&email=writer%40example.com"
                f"&comment=hop+comment+{a.seed}-{n}&submit=Post").encode()
        try:
            c = http.client.HTTPConnection(FRONT, 8000, timeout=60)
            c.request("POST", "/wp-comments-post.php", body,
                      {"Content-Type": "application/x-www-form-urlencoded", "Connection": "close"})
            r = c.getresponse()
            r.read()
            loc = r.getheader("Location") or ""
            m = re.search(r"#comment-(\d+)", loc)
            if r.status in (302, 303) and m:
                out.write(f"ok {m.group(1)} {time.time() - t0:.3f}\n")
            else:
                out.write(f"fail HTTP {r.status} {loc}\n")
            c.close()
        except Exception as e:
            out.write(f"fail {e}\n")
        time.sleep(max(0.0, a.every - (time.time() - t0)))


# ---- the experiment ----

class Experiment:
    def __init__(self, a):
        self.a = a
        self.w = tempfile.mkdtemp(prefix="hop-paper.", dir="/dev/shm")
        self.procs = []
        self.runc = {s: os.path.join(self.w, f"runc-{s}") for s in "ab"}
        self.here = "a"

    def start(self, argv, **kw):
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    # -- set-up --
    def network(self):
        a = self.a
        run(["bash", os.path.join(ROOT, "scripts/netns.sh"), "up", PREFIX, a.rate, f"{a.rtt:g}"])
        run(["ip", "netns", "add", f"{PREFIX}-c"])
        run(["ip", "-n", f"{PREFIX}-c", "link", "set", "lo", "up"])
        run(["ip", "link", "add", f"{PREFIX}-vc", "netns", f"{PREFIX}-c", "type", "veth", "peer", "name",
             f"{PREFIX}-vf", "netns", f"{PREFIX}-a"])
        run(["ip", "-n", f"{PREFIX}-c", "addr", "add", f"{CLIENT}/24", "dev", f"{PREFIX}-vc"])
        run(["ip", "-n", f"{PREFIX}-a", "addr", "add", f"{FRONT}/24", "dev", f"{PREFIX}-vf"])
        run(["ip", "-n", f"{PREFIX}-c", "link", "set", f"{PREFIX}-vc", "up"])
        run(["ip", "-n", f"{PREFIX}-a", "link", "set", f"{PREFIX}-vf", "up"])

    def agents(self):
        w = self.w
        self.client_id = os.path.join(w, "id-client")
        fp = run([HOP, "keygen", "--out", self.client_id], capture_output=True, text=True).stdout.strip()
        ak = os.path.join(w, "authorized_keys")
        open(ak, "w").write(fp + "\n")
        for s in "ab":
            run([HOP, "keygen", "--out", os.path.join(w, f"id-{s}")], capture_output=True)
            root = os.path.join(w, f"root-{s}")
            os.makedirs(root)
            self.start(enter(s) + [HOP, "serve", "--listen", f"{SITE[s]}:7420", "--root", root,
                                   "--identity", os.path.join(w, f"id-{s}"), "--authorized-keys", ak,
                                   "--runc-root", self.runc[s]],
                       stdout=subprocess.DEVNULL, stderr=open(os.path.join(w, f"serve-{s}.log"), "w"))
        time.sleep(0.5)

    def hop(self, side, *args, **kw):
        return subprocess.run(enter(side) + [HOP, *args, "--identity", self.client_id, "--known-hosts",
                                             os.path.join(self.w, "known_hosts"), "--accept-new"], **kw)

    def bundle(self, name, args, mounts):
        b = os.path.join(self.w, "bundles", name)
        os.makedirs(b)
        run(["runc", "spec", "--bundle", b])
        cfg = json.load(open(os.path.join(b, "config.json")))
        cfg["root"] = {"path": self.a.rootfs, "readonly": True}
        p = cfg["process"]
        p["terminal"] = False
        p["args"] = args
        p["cwd"] = "/"
        # Docker's default set: the daemons change owners and drop to their own users.
        caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_SETGID", "CAP_SETUID",
                "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
                "CAP_AUDIT_WRITE"]
        for k in ["bounding", "effective", "permitted"]:
            p["capabilities"][k] = caps
        for dest in ["/run", "/tmp", "/var/log", "/var/cache/apache2"]:
            cfg["mounts"].append({"destination": dest, "type": "tmpfs", "source": "tmpfs",
                                  "options": ["nosuid", "nodev", "mode=1777"]})
        for src, dest in mounts:
            # Relative to the bundle (runc resolves it there): the data moves with the bundle.
            cfg["mounts"].append({"destination": dest, "type": "bind", "source": src,
                                  "options": ["rbind", "rw"]})
        cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"]
        # A user namespace with an identity map: file owners stay as they are, and CRIU (root,
        # the namespace's owner) may read the rlimits of the daemons' workers (mysql, www-data).
        # Without it this machine refuses that: root lacks CAP_SYS_RESOURCE here (see
        # ../shared/notes/criu-on-this-kernel.md).
        cfg["linux"]["namespaces"].append({"type": "user"})
        ident = [{"containerID": 0, "hostID": 0, "size": 65536}]
        cfg["linux"]["uidMappings"] = ident
        cfg["linux"]["gidMappings"] = ident
        # No /sys: sysfs cannot be mounted afresh without a network namespace of the
        # container's own, a bind of the host's drags its cgroup mounts in, and neither daemon
        # needs it.
        cfg["mounts"] = [m for m in cfg["mounts"] if m["destination"] not in ("/sys", "/sys/fs/cgroup")]
        criu_conf = os.path.join(self.w, "criu.conf")
        cfg.setdefault("annotations", {})["org.criu.config"] = criu_conf
        json.dump(cfg, open(os.path.join(b, "config.json"), "w"), indent=1)
        return b

    def containers(self):
        w, r = self.w, self.a.rootfs
        # MariaDB holds file locks on its tablespaces; CRIU dumps and restores them when told.
        open(os.path.join(w, "criu.conf"), "w").write("tcp-close\nskip-in-flight\nfile-locks\n")
        db = self.bundle("db", ["/bin/sh", "-c", "mkdir -p /run/mysqld && chown mysql: /run/mysqld && "
                                "exec /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --core-file"],
                         [("data/mysql", "/var/lib/mysql")])
        os.makedirs(os.path.join(db, "data"))
        run(["cp", "-a", os.path.join(r, "var/lib/mysql"), os.path.join(db, "data/mysql")])
        web = self.bundle("web", ["/bin/sh", "-c",
                                  ". /etc/apache2/envvars; mkdir -p /run/lock $APACHE_RUN_DIR $APACHE_LOCK_DIR $APACHE_LOG_DIR;"
                                  " exec /usr/sbin/apache2 -D FOREGROUND -c 'CoreDumpDirectory /tmp'"],
                          [("data/wordpress", "/var/lib/wordpress")])
        os.makedirs(os.path.join(web, "data"))
        run(["cp", "-a", os.path.join(r, "var/lib/wordpress"), os.path.join(web, "data/wordpress")])
        self.bundles = {"db": db, "web": web}
        for name in ["db", "web"]:
            self.runc_run("a", name)
            if name == "db":
                wait_port("a", "127.0.0.1", 3306)
                sql = (f"CREATE DATABASE IF NOT EXISTS wordpress; CREATE USER IF NOT EXISTS "
                       f"'wordpress'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}'; GRANT ALL ON wordpress.* "
                       f"TO 'wordpress'@'127.0.0.1'; FLUSH PRIVILEGES;")
                run(["runc", "--root", self.runc["a"], "exec", "db", "mariadb", "-e", sql])
            else:
                wait_port("a", "127.0.0.1", 8080)

    def runc_run(self, side, name):
        out = os.path.join(self.w, f"{name}.out")
        run(["setsid", "sh", "-c",
             f"true | {' '.join(enter(side))} runc --root {self.runc[side]} run -d "
             f"--bundle {self.bundles[name]} {name} 2>&1 | cat >> {out} &"])

    def haproxy(self):
        w = self.w
        self.sock = os.path.join(w, "haproxy.sock")
        cfg = os.path.join(w, "haproxy.cfg")
        open(cfg, "w").write(
            f"global\n    stats socket {self.sock} mode 600 level admin\n"
            f"    lua-load {ROOT}/scripts/haproxy/hold.lua\n    maxconn 2000\n"
            # Every request's status and termination state, to tell what any failure was.
            "    log stderr format short local0 info\n"
            # No idle server connections across a checkpoint; requests wait, they are not refused.
            "defaults\n    mode http\n    log global\n    option httplog\n    timeout connect 2s\n    timeout client 120s\n"
            "    timeout server 120s\n    timeout queue 120s\n    option http-server-close\n"
            f"frontend fe\n    bind {FRONT}:8000\n    default_backend be\n"
            "backend be\n    http-request lua.hold_until_up be 60000\n"
            "    server web 127.0.0.1:8080\n")
        self.start(enter("a") + ["haproxy", "-f", cfg, "-db"], stdout=subprocess.DEVNULL,
                   stderr=open(os.path.join(w, "haproxy.log"), "w"))
        wait_port("a", FRONT, 8000)

    def vpn(self):
        r = self.hop("a", "vpn", "up", f"quic://{SITE['b']}:7420", "--addr", f"{VPN['a']}/24",
                     "--peer-addr", f"{VPN['b']}/24", capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit("hop vpn up failed: " + r.stderr)
        time.sleep(1.5)

    def wordpress(self):
        """Install WordPress through HAProxy (so its site URL is the front end's)."""
        body = ("weblog_title=Hop+paper+experiment&user_name=admin&admin_password=hop-paper-admin-9"
                "&admin_password2=hop-paper-admin-9&pw_weak=on&admin_email=admin%40example.com"
                "&blog_public=0&Submit=Install+WordPress")
        r = subprocess.run(enter("c") + ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-d", body,
                                         f"http://{FRONT}:8000/wp-admin/install.php?step=2"],
                           capture_output=True, text=True)
        if r.stdout.strip() != "200":
            sys.exit(f"WordPress install answered {r.stdout!r}")
        self.front_page()

    def front_page(self):
        r = subprocess.run(enter("c") + ["curl", "-si", "--max-time", "20", f"http://{FRONT}:8000/"],
                           capture_output=True, text=True)
        if "Hello world!" not in r.stdout:
            raise RuntimeError(f"the front page does not show WordPress's first post: {r.stdout[:600]!r}")
        return r.stdout

    # -- one migration under load --
    def group_file(self, there):
        addr = f"{VPN['b']}:8080" if there == "b" else "127.0.0.1:8080"
        path = os.path.join(self.w, f"group-{there}.toml")
        open(path, "w").write(
            f'runc_root = "{self.runc[self.here]}"\nhaproxy = "{self.sock}"\n\n'
            '[[container]]\nid = "db"\n\n'
            f'[[container]]\nid = "web"\nhaproxy_server = "be/web"\nhaproxy_addr = "{addr}"\n')
        return path

    def comments_at(self, side):
        r = run(["runc", "--root", self.runc[side], "exec", "db", "mariadb", "-N", "-e",
                 "SELECT comment_ID FROM wordpress.wp_comments"], capture_output=True, text=True)
        return set(r.stdout.split())

    def one(self, clients, n):
        a, w = self.a, self.w
        there = "b" if self.here == "a" else "a"
        tag = f"c{clients}-r{n}"
        stop = os.path.join(w, f"stop-{tag}")
        wlog = os.path.join(w, f"writes-{tag}.log")
        writer = self.start(enter("c") + [sys.executable, os.path.abspath(__file__), "write", "--out", wlog,
                                          "--stop", stop, "--seed", tag])
        siege = None
        if clients:
            rc = os.path.join(w, "siegerc")
            open(rc, "w").write("parser = false\nprotocol = HTTP/1.1\nconnection = close\nlogging = false\n"
                                "timeout = 120\nfailures = 1000000\nshow-logfile = false\njson_output = true\n")
            siege = subprocess.Popen(enter("c") + ["env", f"SIEGERC={rc}", "siege", "-q", "-c", str(clients),
                                                   "-d", "1", "-t", "10M", f"http://{FRONT}:8000/"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(a.warmup)
        report = os.path.join(w, f"timeline-{tag}.json")
        t0 = time.time()
        mig = self.hop(self.here, "migrate", "--group", self.group_file(there), "--report-json", report,
                       "--max-downtime", a.max_downtime, f"quic://{SITE[there]}:7420",
                       capture_output=True, text=True)
        total = time.time() - t0
        with open(os.path.join(w, f"migrate-{tag}.log"), "w") as f:
            f.write(mig.stdout + mig.stderr)
        time.sleep(a.cooldown)
        open(stop, "w").close()
        stats = {}
        if siege:
            siege.send_signal(signal.SIGINT)
            out, err = siege.communicate(timeout=120)
            stats = parse_siege(out + err)
        writer.wait(timeout=120)
        self.procs.remove(writer)
        rolled_back = mig.returncode != 0
        if rolled_back:
            # hop's promise then: the group runs at the source again, no request failed, no
            # write lost. Counted, checked like a move, left out of the medians.
            print(f"  migration {tag} failed and rolled back:\n{mig.stderr[-3000:]}", file=sys.stderr)
            if "rolled back" not in mig.stderr and "still runs at the source" not in mig.stderr:
                sys.exit(f"migration {tag} failed without a rollback")
            there = self.here
        self.here = there
        lines = open(wlog).read().split("\n")
        acked = {l.split()[1] for l in lines if l.startswith("ok ")}
        wfail = [l for l in lines if l.startswith("fail")]
        wlongest = max([float(l.split()[2]) for l in lines if l.startswith("ok ")] or [0])
        missing = acked - self.comments_at(there)
        self.front_page()
        members = [] if rolled_back else json.load(open(report))
        return {"clients": clients, "run": n, "to": there, "timeline": members, "wall_s": total,
                "rolled_back": rolled_back,
                "siege": stats, "writer": {"acked": len(acked), "failed": len(wfail), "longest_s": wlongest,
                                           "failures": wfail[:5]},
                "missing_comments": sorted(missing)}

    def stop(self):
        subprocess.run(["runc", "--root", self.runc["a"], "delete", "-f", "web"], capture_output=True)
        for s in "ab":
            for c in ["web", "db"]:
                subprocess.run(["runc", "--root", self.runc[s], "delete", "-f", c], capture_output=True)
        try:
            self.hop("a", "vpn", "down", f"quic://{SITE['b']}:7420", capture_output=True, timeout=30)
        except Exception:
            pass
        for p in self.procs:
            p.kill()
            p.wait()
        subprocess.run(["ip", "netns", "del", f"{PREFIX}-c"], capture_output=True)
        subprocess.run(["bash", os.path.join(ROOT, "scripts/netns.sh"), "down", PREFIX])
        if not self.a.keep:
            shutil.rmtree(self.w, ignore_errors=True)


def parse_siege(text):
    """siege's closing JSON block (its keys vary slightly between versions)."""
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        return {"raw": text[-500:]}
    try:
        return json.loads(m.group(0))
    except ValueError:
        return {"raw": m.group(0)[-500:]}


def columns(members):
    """Table III's columns for one group migration, in seconds: the slowest member of each phase
    (members pre-copy in parallel); restores in turn, so theirs add up."""
    def rounds(m):
        return m["rounds"]
    pre = [r for m in members for r in rounds(m)[:1]]
    pre_dump = max(r["dump_ms"] for r in pre) / 1e3
    pre_copy = max(sum(r["sync_ms"] for r in rounds(m)[:-1]) for m in members) / 1e3
    finals = [rounds(m)[-1] for m in members]
    return {
        "pre_dump": pre_dump,
        "pre_copy": pre_copy,
        "checkpoint": max(f["dump_ms"] for f in finals) / 1e3,
        # The paper's "diff" (rsync's comparison of the dumps) is hop's chunking, done while
        # CRIU writes the images: nothing is left of it after the freeze.
        "diff": 0.0,
        "transfer": max(f["sync_ms"] for f in finals) / 1e3 + max(m["final_fs_sync_ms"] for m in members) / 1e3,
        "restore": sum(m["restore_ms"] for m in members) / 1e3,
        "downtime": max(m["downtime_ms"] for m in members) / 1e3,
        "total": max(m["total_ms"] for m in members) / 1e3,
    }


def summarize(results, scenarios):
    cols = ["pre_dump", "pre_copy", "checkpoint", "diff", "transfer", "restore", "downtime", "total"]
    head = ("| scenario | | pre-dump | pre-copy | checkpoint | diff | transfer | restore | **downtime** | total "
            "| requests (failed) | longest request | comments acked (missing) |")
    lines = [head, "|" + " --- |" * 13]
    out = {}
    for c in scenarios:
        rs = [r for r in results if r["clients"] == c]
        if not rs:
            continue
        cs = [columns(r["timeline"]) for r in rs if not r["rolled_back"]]
        back = sum(r["rolled_back"] for r in rs)
        med = {k: statistics.median(x[k] for x in cs) if cs else float("nan") for k in cols}
        reqs = sum(r["siege"].get("transactions", 0) for r in rs)
        failed = sum(r["siege"].get("failed_transactions", 0) for r in rs) + sum(r["writer"]["failed"] for r in rs)
        longest = max([r["siege"].get("longest_transaction", 0) for r in rs] + [r["writer"]["longest_s"] for r in rs])
        acked = sum(r["writer"]["acked"] for r in rs)
        missing = sum(len(r["missing_comments"]) for r in rs)
        out[c] = {"median_s": med, "paper_downtime_s": PAPER.get(c, {}).get("downtime"),
                  "runs": len(rs), "rolled_back": back, "requests": reqs, "failed": failed,
                  "longest_s": longest, "comments_acked": acked, "comments_missing": missing}
        label = f"median of {len(cs)}" + (f", {back} rolled back" if back else "")
        lines.append(f"| {c} clients | hop ({label}) | " + " | ".join(
            f"**{med[k]:.2f}**" if k == "downtime" else f"{med[k]:.2f}" for k in cols) +
            f" | {reqs} ({failed}) | {longest:.2f} s | {acked} ({missing}) |")
        p = PAPER.get(c)
        if p:
            lines.append(f"| | paper (GCP) | " + " | ".join(f"{p[k]:.2f}" for k in cols) + " | | | |")
    return out, "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    wp = sub.add_parser("write")
    wp.add_argument("--out", required=True)
    wp.add_argument("--stop", required=True)
    wp.add_argument("--seed", default="0")
    wp.add_argument("--every", type=float, default=0.2)
    p.add_argument("--rootfs", default=os.path.join(ROOT, ".cache/paper/rootfs"))
    p.add_argument("--rate", default="200mbit", help="link between the sites (tc tbf)")
    p.add_argument("--rtt", type=float, default=20, help="added round-trip time between the sites, ms")
    p.add_argument("--clients", type=int, nargs="+", default=[0, 1, 5, 10, 50])
    p.add_argument("--reps", type=int, default=3, help="runs per scenario (the paper: 10)")
    p.add_argument("--warmup", type=float, default=5, help="seconds of load before each move")
    p.add_argument("--cooldown", type=float, default=3, help="seconds of load after each move")
    p.add_argument("--max-downtime", default="2s")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results"))
    p.add_argument("--name", default="paper-experiment")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args()
    if a.cmd == "write":
        return cmd_write(a)
    if not os.path.exists(os.path.join(a.rootfs, ".hop-paper-ready")):
        sys.exit(f"no container image at {a.rootfs}: run scripts/paper-rootfs.sh")
    e = Experiment(a)
    results = []
    try:
        e.network()
        e.agents()
        e.containers()
        e.haproxy()
        e.vpn()
        e.wordpress()
        print(f"WordPress and MariaDB run at site a; the sites: {a.rate}, RTT +{a.rtt:g} ms", flush=True)
        for c in a.clients:
            for n in range(a.reps):
                r = e.one(c, n)
                results.append(r)
                if r["rolled_back"]:
                    moved = f"rolled back, still at {r['to']}"
                else:
                    col = columns(r["timeline"])
                    moved = (f"-> {r['to']}: downtime {col['downtime']:.2f} s (checkpoint "
                             f"{col['checkpoint']:.2f}, transfer {col['transfer']:.2f}, restore "
                             f"{col['restore']:.2f})")
                print(f"{c:3d} clients, run {n + 1}: {moved}, {r['siege'].get('transactions', 0)} requests, "
                      f"{r['siege'].get('failed_transactions', 0) + r['writer']['failed']} failed, longest "
                      f"{max(r['siege'].get('longest_transaction', 0), r['writer']['longest_s']):.2f} s, "
                      f"{r['writer']['acked']} comments acked, {len(r['missing_comments'])} missing", flush=True)
    finally:
        e.stop()
    out, table = summarize(results, a.clients)
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, a.name)
    json.dump({"settings": vars(a), "scenarios": out, "runs": results}, open(base + ".json", "w"), indent=1)
    open(base + ".md", "w").write(table + "\n")
    print(table)
    if os.path.exists(PLOT):
        subprocess.run([PLOT, base + ".json"])
    bad = [c for c, o in out.items() if o["failed"] or o["comments_missing"]]
    if bad:
        sys.exit(f"failed requests or lost comments in scenarios {bad}")


if __name__ == "__main__":
    main()
