#!/usr/bin/env python3
"""hop over QUIC against rsync (daemon and over ssh) between two network namespaces.

Run through scripts/bench-remote.sh, which builds hop and sets up the namespaces. Each repetition
does, for every tool in alternating order: a fresh copy of the tree to an empty destination;
then the tree is edited (gen-tree.py edit: 1% of 4 KiB pages rewritten plus insertions) and
every tool syncs the edit onto its copy. Wall time is measured around the client command; bytes
on the wire are the receiver namespace's veth counters (both directions), not the tools' own
figures. CPU time: the client's user+sys (/usr/bin/time) plus the server's (hop serve, or the
daemon with its reaped session processes, from /proc; the rsync daemon's forked sessions are not
captured and show 0). Peak RSS: the client's, and hop serve's (VmHWM, reset before each run).
Prints medians (min-max) and ratios against rsync over ssh; writes JSON and Markdown.
"""
import shlex
import argparse, json, os, shutil, statistics, subprocess, sys, time

NS_A, NS_B = "hb-a", "hb-b"
SERVER = "10.77.0.2"


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def in_a(*args):
    return ["ip", "netns", "exec", NS_A, *args]


def in_b(*args):
    return ["ip", "netns", "exec", NS_B, *args]


def wire_bytes(netns_sh):
    return int(subprocess.check_output([netns_sh, "bytes", "hb"]).decode().strip())


class Bench:
    def __init__(self, a):
        self.a = a
        self.w = a.work
        self.repo = a.repo
        self.hop = os.path.join(self.repo, "target/release/hop")
        self.netns = os.path.join(self.repo, "scripts/netns.sh")
        self.procs = []

    # --- servers -------------------------------------------------------------------------
    def start(self, argv, **kw):
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def setup(self):
        w = self.w
        for d in ["dst-hop", "dst-rsd", "dst-ssh", "keys"]:
            os.makedirs(os.path.join(w, d), exist_ok=True)
        k = os.path.join(w, "keys")
        # hop identities
        srv_fp = subprocess.check_output([self.hop, "keygen", "--out", f"{k}/hop-srv"]).decode().strip()
        cli_fp = subprocess.check_output([self.hop, "keygen", "--out", f"{k}/hop-cli"]).decode().strip()
        open(f"{k}/authorized_keys", "w").write(cli_fp + "\n")
        open(f"{k}/known_hosts", "w").write(f"{SERVER}:7420 {srv_fp}\n")
        serve = self.hop_serve = self.start(in_b(self.hop, "serve", "--listen", f"{SERVER}:7420", "--root", f"{w}/dst-hop",
                                "--identity", f"{k}/hop-srv", "--authorized-keys", f"{k}/authorized_keys"),
                           stdout=subprocess.PIPE, stderr=open(f"{w}/serve.log", "w"))
        line = serve.stdout.readline().decode()
        if "listening" not in line:
            sys.exit("hop serve did not start: " + open(f"{w}/serve.log").read())
        # rsync daemon
        open(f"{w}/rsyncd.conf", "w").write(
            f"pid file = {w}/rsyncd.pid\n[bench]\npath = {w}/dst-rsd\nuse chroot = yes\nread only = false\nuid = root\ngid = root\n")
        self.rsyncd = self.start(in_b("rsync", "--daemon", "--no-detach", f"--config={w}/rsyncd.conf", "--port=8730",
                        f"--address={SERVER}"), stderr=subprocess.DEVNULL)
        # sshd
        os.makedirs("/run/sshd", exist_ok=True)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{k}/ssh_host", stdout=subprocess.DEVNULL)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{k}/ssh_cli", stdout=subprocess.DEVNULL)
        shutil.copy(f"{k}/ssh_cli.pub", f"{k}/ssh_authorized")
        open(f"{w}/sshd_config", "w").write(
            f"ListenAddress {SERVER}\nPort 22\nHostKey {k}/ssh_host\nAuthorizedKeysFile {k}/ssh_authorized\n"
            f"PermitRootLogin yes\nPasswordAuthentication no\nUsePAM no\nPidFile {w}/sshd.pid\n"
            "StrictModes no\nSubsystem sftp internal-sftp\n")
        self.sshd = self.start(in_b("/usr/sbin/sshd", "-D", "-e", "-f", f"{w}/sshd_config"), stderr=open(f"{w}/sshd.log", "w"))
        self.ssh = (f"ssh -i {k}/ssh_cli -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                    f"-o BatchMode=yes -o LogLevel=ERROR -c aes128-gcm@openssh.com")
        time.sleep(1.0)
        # Wait until everything answers.
        for _ in range(50):
            ok = subprocess.run(in_a("rsync", f"rsync://{SERVER}:8730/bench/"), capture_output=True).returncode == 0
            ok = ok and subprocess.run(in_a(*self.ssh.split(), f"root@{SERVER}", "true"), capture_output=True).returncode == 0
            if ok:
                return
            time.sleep(0.2)
        sys.exit("rsync daemon or sshd did not start; see " + w)

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()

    # --- tools ---------------------------------------------------------------------------
    def tools(self):
        k, w, src = f"{self.w}/keys", self.w, f"{self.w}/src/"
        # Each hop variant keeps its sender cache in a directory of its own, so that one variant's
        # run never warms the next one's.
        # Every tool deletes what the source no longer has (a package upgrade removes files).
        hop = lambda tool: ["env", f"XDG_CACHE_HOME={w}/cache-{tool}", self.hop, "sync", "-a", "-q", "--delete",
                            "--identity", f"{k}/hop-cli", "--known-hosts", f"{k}/known_hosts"]
        # Each tool syncs into a destination of its own.
        t = {
            "hop": (in_a(*hop("hop"), src, f"quic://{SERVER}:7420/hop"), f"{w}/dst-hop/hop"),
            "hop-zstd": (in_a(*hop("hop-zstd"), "--compress", "zstd:1", src, f"quic://{SERVER}:7420/hop-zstd"),
                         f"{w}/dst-hop/hop-zstd"),
            # The best settings found by tuning (benchmarks/README.md): zstd level 1, and large
            # files updated in place (only changed data written; not old-or-new on a crash).
            "hop-tuned": (in_a(*hop("hop-tuned"), "--compress", "zstd:1", "--inplace", src,
                               f"quic://{SERVER}:7420/hop-tuned"), f"{w}/dst-hop/hop-tuned"),
            "rsync-ssh": (in_a("rsync", "-a", "--delete", "-e", self.ssh, src, f"root@{SERVER}:{w}/dst-ssh/plain"),
                          f"{w}/dst-ssh/plain"),
            "rsync-ssh-z": (in_a("rsync", "-az", "--delete", "-e", self.ssh, src, f"root@{SERVER}:{w}/dst-ssh/z"),
                            f"{w}/dst-ssh/z"),
            # rsync's own answer to large files with small changes (same trade-off as hop's
            # --inplace: no new copy, not old-or-new on a crash).
            "rsync-ssh-z-inplace": (in_a("rsync", "-az", "--inplace", "--delete", "-e", self.ssh, src,
                                       f"root@{SERVER}:{w}/dst-ssh/inplace"), f"{w}/dst-ssh/inplace"),
            "rsyncd": (in_a("rsync", "-a", "--delete", src, f"rsync://{SERVER}:8730/bench/t"), f"{w}/dst-rsd/t"),
        }
        # Tuning variants: hop with extra options, as tools "hop:NAME".
        for v in self.a.hop_variant:
            name, _, args = v.partition("=")
            tool = f"hop:{name}"
            t[tool] = (in_a(*hop(tool), *shlex.split(args), src, f"quic://{SERVER}:7420/v-{name}"),
                       f"{w}/dst-hop/v-{name}")
        return {name: t[name] for name in self.a.tools + [f"hop:{v.partition('=')[0]}" for v in self.a.hop_variant]}

    def server_of(self, name):
        if name.startswith("hop"):
            return self.hop_serve.pid
        return {"rsync-ssh": self.sshd, "rsync-ssh-z": self.sshd, "rsync-ssh-z-inplace": self.sshd,
                "rsyncd": self.rsyncd}[name].pid

    @staticmethod
    def cpu_s(pid):
        """CPU seconds of a process and its reaped children (a daemon's sessions)."""
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")

    def run(self, name, argv):
        os.sync()  # start every run with no dirty pages left by the previous one
        server = self.server_of(name)
        if name.startswith("hop"):
            open(f"/proc/{server}/clear_refs", "w").write("5")  # reset the peak RSS
        c0 = self.cpu_s(server)
        b0 = wire_bytes(self.netns)
        usage = f"{self.w}/time.out"
        t0 = time.monotonic()
        r = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", usage, *argv], capture_output=True)
        dt = time.monotonic() - t0
        if r.returncode != 0:
            sys.exit(f"{name} failed ({r.returncode}): {' '.join(argv)}\n{r.stderr.decode()}")
        user, sys_, rss_kib = open(usage).read().split()[-3:]
        out = {"s": dt, "wire": wire_bytes(self.netns) - b0,
               "client_cpu_s": float(user) + float(sys_), "client_rss_mib": int(rss_kib) / 1024,
               "server_cpu_s": self.cpu_s(server) - c0}
        if name.startswith("hop"):
            hwm = [l for l in open(f"/proc/{server}/status") if l.startswith("VmHWM")][0]
            out["server_rss_mib"] = int(hwm.split()[1]) / 1024
        return out

    def verify(self, dest):
        r = subprocess.run(["diff", "-r", "--no-dereference", f"{self.w}/src", dest], capture_output=True)
        if r.returncode != 0:
            sys.exit(f"{dest} differs from the source:\n{r.stdout.decode()[:2000]}")

    def main(self):
        self.setup()
        tools = self.tools()
        names = list(tools)
        res = {n: {"fresh": [], "delta": []} for n in names}
        try:
            for rep in range(self.a.reps):
                order = names if rep % 2 == 0 else names[::-1]
                for n in order:
                    argv, dest = tools[n]
                    shutil.rmtree(dest, ignore_errors=True)
                    # The sender starts cold, like rsync.
                    shutil.rmtree(f"{self.w}/cache-{n}", ignore_errors=True)
                    if self.a.delta_only:
                        # Seed the copy locally, then let the tool see it once (untimed): hop
                        # builds its caches, rsync its page cache, as after a real first sync.
                        sh("cp", "-a", f"{self.w}/src", dest)
                        subprocess.run(argv, check=True, capture_output=True)
                    else:
                        res[n]["fresh"].append(self.run(n, argv))
                    self.verify(dest)
                # Every tool's copy now holds the current tree: edit it, sync the edit.
                if self.a.edit_cmd:
                    sh("bash", "-c", self.a.edit_cmd.format(src=f"{self.w}/src", seed=100 + rep))
                else:
                    sh("python3", f"{self.repo}/scripts/gen-tree.py", "edit", f"{self.w}/src",
                       "--kind", self.a.kind, "--seed", str(100 + rep), stdout=subprocess.DEVNULL)
                for n in order:
                    argv, dest = tools[n]
                    res[n]["delta"].append(self.run(n, argv))
                    self.verify(dest)
                print(f"repetition {rep + 1}/{self.a.reps} done", file=sys.stderr)
        finally:
            self.stop()
        self.commands = {n: shlex.join(tools[n][0]) for n in names}
        return res


def summarize(res, names, base):
    med = lambda xs: statistics.median(xs)
    out = {}
    for n in names:
        out[n] = {}
        for phase in ["fresh", "delta"]:
            runs = [r for r in res[n][phase] if r]
            if not runs:
                continue
            out[n][phase] = {
                "s_median": med([r["s"] for r in runs]), "s_min": min(r["s"] for r in runs),
                "s_max": max(r["s"] for r in runs), "wire_median": med([r["wire"] for r in runs]),
                "client_cpu_s": med([r["client_cpu_s"] for r in runs]),
                "server_cpu_s": med([r["server_cpu_s"] for r in runs]),
                "client_rss_mib": max(r["client_rss_mib"] for r in runs),
                "server_rss_mib": max((r.get("server_rss_mib", 0) for r in runs)) or None,
                "runs": runs}
    lines = [f"| tool | phase | wall s median (min-max) | wire MB median | time vs {base} | wire vs {base} "
             "| CPU s client + server | peak RSS MiB client / server |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for phase in ["fresh", "delta"]:
        for n in names:
            if not out[n].get(phase):
                continue
            o, b = out[n][phase], out[base][phase] if base in out else None
            rt = f"{b['s_median'] / o['s_median']:.2f}x faster" if b else "-"
            rw = f"{o['wire_median'] / b['wire_median']:.3f}" if b else "-"
            lines.append(f"| {n} | {phase} | {o['s_median']:.2f} ({o['s_min']:.2f}-{o['s_max']:.2f}) | "
                         f"{o['wire_median'] / 1e6:.1f} | {rt} | {rw} | "
                         f"{o['client_cpu_s']:.2f} + {o['server_cpu_s']:.2f} | {o['client_rss_mib']:.0f} / "
                         f"{'%.0f' % o['server_rss_mib'] if o['server_rss_mib'] else 'n/a'} |")
    return out, "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tools", nargs="+",
                    default=["hop", "hop-zstd", "hop-tuned", "rsync-ssh", "rsync-ssh-z", "rsync-ssh-z-inplace",
                             "rsyncd"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="remote")
    ap.add_argument("--delta-only", action="store_true",
                    help="seed destinations with a local copy instead of a timed fresh sync")
    ap.add_argument("--hop-variant", action="append", default=[], metavar="NAME=ARGS",
                    help="also run hop with these extra options, as tool hop:NAME (tuning sweeps)")
    ap.add_argument("--kind", default="tree", help="gen-tree.py kind of the workload (for its edit)")
    ap.add_argument("--edit-cmd", help="shell command that edits {src} instead of gen-tree.py ({seed})")
    ap.add_argument("--limit-bytes", type=int,
                    help="bytes that really changed, compressed: with --rate-bps, the delta's physical limit")
    ap.add_argument("--rate-bps", type=float, help="the link's rate in bits per second")
    a = ap.parse_args()
    bench = Bench(a)
    res = bench.main()
    names = a.tools + [f"hop:{v.partition('=')[0]}" for v in a.hop_variant]
    out, table = summarize(res, names, "rsync-ssh")
    os.makedirs(a.out, exist_ok=True)
    json.dump(out, open(os.path.join(a.out, a.name + ".json"), "w"), indent=1)
    if a.hop_variant:
        hops = [n for n in names if n.startswith("hop") and out[n].get("delta")]
        for phase in ["fresh", "delta"]:
            ranked = sorted((out[n][phase]["s_median"], n) for n in hops if out[n].get(phase))
            if ranked:
                table += f"\nbest {phase}: {ranked[0][1]} ({ranked[0][0]:.2f} s median)"
    if a.limit_bytes and a.rate_bps:
        limit_s = a.limit_bytes * 8 / a.rate_bps
        table += (f"\nphysical limit of the delta: {a.limit_bytes / 1e6:.1f} MB that really changed "
                  f"(compressed) / {a.rate_bps / 1e6:.0f} Mbit/s = {limit_s:.2f} s")
        rsyncs = [out[n]["delta"]["s_median"] for n in names if n.startswith("rsync") and out[n].get("delta")]
        for n in names:
            if n.startswith("hop") and out[n].get("delta"):
                s_ = out[n]["delta"]["s_median"]
                vs = f", {min(rsyncs) / s_:.1f}x faster than the best rsync" if rsyncs else ""
                table += f"\n{n} delta: {s_ / limit_s:.2f}x the physical limit{vs}"
        out["_limit"] = {"bytes": a.limit_bytes, "rate_bps": a.rate_bps, "s": limit_s}
        json.dump(out, open(os.path.join(a.out, a.name + ".json"), "w"), indent=1)
    # The exact command lines, as run (the sender's namespace first).
    commands = "\n".join(f"- {n}: `{c}`" for n, c in bench.commands.items())
    out["_commands"] = bench.commands
    json.dump(out, open(os.path.join(a.out, a.name + ".json"), "w"), indent=1)
    open(os.path.join(a.out, a.name + ".md"), "w").write(table + "\n\nCommands:\n\n" + commands + "\n")
    print(table)
    print("commands:\n" + commands)
