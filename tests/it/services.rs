//! Services (SPEC §4) and trial installs (SPEC §3) with real processes under the `process`
//! backend.
//!
//! Every test service is a small Perl script that the package itself deploys, under a file
//! name unique to the test, so its `/proc/PID/comm` (the script's file name, at most 15
//! bytes) identifies it and tests running in parallel never see each other's processes. The
//! configured start command runs whatever version of the script is on disk. The script
//! appends what it sees to an events log in the temp dir:
//!
//! ```text
//! start   NAME v=VERSION pid=PID disk=D   when it starts
//! term    NAME v=VERSION pid=PID disk=D   on SIGTERM, then it exits 0
//! ignored NAME v=VERSION pid=PID disk=D   on SIGTERM, when this version ignores it
//! exit    NAME v=VERSION pid=PID disk=D   a version that cannot start exits at once
//! post    LABEL v=$TOPE_VERSION tx=$TOPE_TX_ID cwd=$(pwd) disk=D   (post commands)
//! ```
//!
//! where D is the content of `etc/version` on disk at that moment (deployed by every
//! package), so the log shows whether the files were old or new when a service was stopped,
//! started, or a post command ran. Which version a running process is comes from its own
//! `start` line. Orders between services are read from the log for stops (the updater waits
//! for each to be gone before the next) and from the kernel's process start times for starts
//! (the updater starts the next one only after the previous one settled).
//!
//! A `Lab` SIGKILLs every process it knows (by comm, and its own children by pid) when
//! dropped, also when a test fails, so no stray is left behind.
//!
//! The crash, post-command-crash and trial tests need `--features failpoints` (crash points
//! and the `TOPE_BOOT_ID_FILE` seam); the signal-permission test needs root (like
//! diskfull.rs: built by another user it is `#[ignore]`d, see build.rs). Run with
//! `cargo test --features failpoints --test it services`.

#![cfg_attr(not(feature = "failpoints"), allow(dead_code))]

use crate::support::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const V1: &str = "1.0.0";
const V2: &str = "2.0.0";
const PERL: &str = "/usr/bin/perl";
/// How long to wait for something that should happen promptly (generous: a loaded 2-core
/// machine). Only a bound against hanging forever, never a measurement.
const PATIENCE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- processes

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A process/file name unique to this test run and at most 15 bytes (the kernel's comm).
fn unique(tag: &str) -> String {
    let s = format!("{tag}{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
    assert!(s.len() <= 15, "{s} is longer than a comm");
    s
}

#[derive(Debug, Clone, Copy)]
struct ProcStat {
    state: char,
    /// Clock ticks after boot at which the process was created.
    start_ticks: u64,
}

fn proc_stat(pid: i32) -> Option<ProcStat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split(' ').collect();
    Some(ProcStat { state: f.first()?.chars().next()?, start_ticks: f.get(19)?.parse().ok()? })
}

fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end_matches('\n').to_string())
}

/// Every process (zombies included) whose comm is `name`, by pid.
fn procs_named(name: &str) -> Vec<(i32, ProcStat)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_str().unwrap_or("").parse::<i32>() else { continue };
        if comm(pid).as_deref() != Some(name) {
            continue;
        }
        if let Some(st) = proc_stat(pid) {
            out.push((pid, st));
        }
    }
    out.sort_by_key(|(pid, _)| *pid);
    out
}

fn is_dead(st: &ProcStat) -> bool {
    matches!(st.state, 'Z' | 'X' | 'x')
}

/// Live (not zombie) processes named `name`.
fn live(name: &str) -> Vec<i32> {
    procs_named(name).into_iter().filter(|(_, st)| !is_dead(st)).map(|(pid, _)| pid).collect()
}

/// `pid` is a live process named `name` (not a zombie, not a reused pid).
fn alive_as(pid: i32, name: &str) -> bool {
    comm(pid).as_deref() == Some(name) && proc_stat(pid).is_some_and(|st| !is_dead(&st))
}

fn wait_until<T>(what: impl Fn() -> String, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() <= deadline, "gave up after {PATIENCE:?} waiting for {}", what());
        std::thread::sleep(Duration::from_millis(25));
    }
}

// ---------------------------------------------------------------- the test service

/// How a version of a test service behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Beh {
    /// Logs `term` and exits 0 on SIGTERM.
    ExitOnTerm,
    /// Logs `ignored` on SIGTERM and keeps running.
    IgnoreTerm,
    /// Logs `start` and `exit`, then exits 1 at once: a version that cannot start.
    ExitAtOnce,
}

const SCRIPT: &str = r#"#!/usr/bin/perl
# tope-updater test service __V__ (__B__)
my ($V, $B) = ('__V__', '__B__');
my ($log, $watch) = @ARGV;
my $name = $0;
$name =~ s{.*/}{};
sub disk {
    open(my $f, '<', $watch) or return 'absent';
    my $c = <$f>;
    $c = '' unless defined $c;
    chomp $c;
    return $c;
}
sub ev {
    open(my $f, '>>', $log) or die "cannot append to $log: $!";
    print $f "$_[0] $name v=$V pid=$$ disk=" . disk() . "\n";
    close $f;
}
$SIG{TERM} = $B eq 'ignore' ? sub { ev('ignored') } : sub { ev('term'); exit 0 };
ev('start');
if ($B eq 'die') { ev('exit'); exit 1 }
sleep 1 while 1;
"#;

fn script(version: &str, beh: Beh) -> Vec<u8> {
    let b = match beh {
        Beh::ExitOnTerm => "term",
        Beh::IgnoreTerm => "ignore",
        Beh::ExitAtOnce => "die",
    };
    SCRIPT.replace("__V__", version).replace("__B__", b).into_bytes()
}

/// One line of the events log.
#[derive(Debug, Clone)]
struct Ev {
    kind: String,
    /// Service name, or the post command's label.
    name: String,
    kv: BTreeMap<String, String>,
}

impl Ev {
    fn get(&self, k: &str) -> &str {
        self.kv.get(k).map(String::as_str).unwrap_or("")
    }
    fn v(&self) -> &str {
        self.get("v")
    }
    fn disk(&self) -> &str {
        self.get("disk")
    }
    fn pid(&self) -> i32 {
        self.get("pid").parse().unwrap_or_else(|_| panic!("no pid in {self:?}"))
    }
    /// `kind name version`, for comparing sequences.
    fn short(&self) -> String {
        format!("{} {} {}", self.kind, self.name, self.v())
    }
}

fn parse_events(text: &str) -> Vec<Ev> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut w = l.split_whitespace();
            let kind = w.next().unwrap_or("").to_string();
            let name = w.next().unwrap_or("").to_string();
            let kv = w
                .filter_map(|x| x.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Ev { kind, name, kv }
        })
        .collect()
}

fn shorts(evs: &[Ev]) -> Vec<String> {
    evs.iter().map(Ev::short).collect()
}

// ---------------------------------------------------------------- the lab

/// A service of a test: its comm, deployed at `svc/<name>` under the root.
struct Svc {
    name: String,
    order: Option<i64>,
}

impl Svc {
    fn rel(&self) -> String {
        format!("svc/{}", self.name)
    }
}

/// One module of a test package.
struct Mod {
    json: Value,
    entry: String,
    content: Vec<u8>,
}

impl Mod {
    fn post(mut self, cmds: &[String]) -> Mod {
        self.json["post_cmds"] = json!(cmds);
        self
    }

    fn owned_by(mut self, process_name: &str, order: Option<i64>) -> Mod {
        self.json["process_name"] = json!(process_name);
        if let Some(o) = order {
            self.json["restart_order"] = json!(o);
        }
        self
    }
}

/// A device in a temp dir with the process backend, an events log, and a boot id file; kills
/// every process it registered when dropped.
struct Lab {
    env: Env,
    log: PathBuf,
    boot_file: PathBuf,
    /// Helper executables, outside the allowed root.
    helpers: PathBuf,
    names: RefCell<Vec<String>>,
    children: RefCell<Vec<Child>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self.children.borrow_mut().iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let names = self.names.borrow().clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pids: Vec<(String, i32)> = names
                .iter()
                .flat_map(|n| live(n).into_iter().map(move |p| (n.clone(), p)))
                .collect();
            if pids.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("warning: could not kill test processes {pids:?}");
                break;
            }
            for (_, pid) in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Lab {
    fn new() -> Lab {
        assert!(
            Path::new(PERL).exists(),
            "the service tests run Perl scripts as services: {PERL} is missing"
        );
        let env = Env::new();
        let log = env.tmp.path().join("events.log");
        let boot_file = env.tmp.path().join("boot_id");
        let helpers = env.tmp.path().join("helpers");
        std::fs::create_dir_all(&helpers).unwrap();
        let lab = Lab {
            env,
            log,
            boot_file,
            helpers,
            names: RefCell::new(vec![]),
            children: RefCell::new(vec![]),
        };
        lab.set_boot(1);
        lab
    }

    /// A new service with a unique comm; killed when the lab is dropped.
    fn svc(&self, order: Option<i64>) -> Svc {
        let name = unique("ts");
        self.names.borrow_mut().push(name.clone());
        Svc { name, order }
    }

    /// Registers a process name to kill when the lab is dropped.
    fn track(&self, name: &str) {
        self.names.borrow_mut().push(name.to_string());
    }

    /// A copy of /usr/bin/sleep under a unique name (its comm) in the helpers dir.
    fn sleeper(&self, tag: &str) -> (String, PathBuf) {
        let name = unique(tag);
        let path = self.helpers.join(&name);
        std::fs::copy("/usr/bin/sleep", &path).unwrap();
        self.track(&name);
        (name, path)
    }

    fn watch(&self) -> PathBuf {
        self.env.path("etc/version")
    }

    fn start_cmd(&self, s: &Svc) -> String {
        format!(
            "{} {} {}",
            self.env.path(&s.rel()).display(),
            self.log.display(),
            self.watch().display()
        )
    }

    /// Writes the config: the process backend, `extra` top-level keys (overriding the test
    /// defaults below), a start command per service, then raw `tables`.
    fn configure(&self, extra: &str, svcs: &[&Svc], tables: &str) {
        let mut c = format!(
            "state_dir = {:?}\nallowed_roots = [{:?}]\nservice_manager = \"process\"\n",
            self.env.state.to_str().unwrap(),
            self.env.root.to_str().unwrap()
        );
        for (k, v) in
            [("start_settle_ms", "300"), ("start_timeout_s", "30"), ("stop_timeout_s", "10")]
        {
            if !extra.lines().any(|l| l.trim_start().starts_with(&format!("{k} "))) {
                c += &format!("{k} = {v}\n");
            }
        }
        c += extra;
        c += "\n";
        for s in svcs {
            c += &format!("\n[services.{}]\nstart = {:?}\n", s.name, self.start_cmd(s));
        }
        c += tables;
        std::fs::write(&self.env.config, c).unwrap();
    }

    // ---- packages

    fn svc_mod(&self, s: &Svc, version: &str, beh: Beh) -> Mod {
        let content = script(version, beh);
        let entry = format!("svc/{}", s.name);
        let mut j = json!({
            "name": format!("svc-{}", s.name),
            "src": entry,
            "dst": self.env.dst(&s.rel()),
            "process_name": s.name,
            "mode": "0755",
            "blake3": blake3_hex(&content),
        });
        if let Some(o) = s.order {
            j["restart_order"] = json!(o);
        }
        Mod { json: j, entry, content }
    }

    fn file_mod(&self, name: &str, rel: &str, content: &[u8]) -> Mod {
        let entry = format!("files/{name}");
        Mod {
            json: json!({
                "name": name,
                "src": entry,
                "dst": self.env.dst(rel),
                "blake3": blake3_hex(content),
            }),
            entry,
            content: content.to_vec(),
        }
    }

    /// `etc/version`, whose content the services and post commands report as `disk=`.
    fn version_mod(&self, version: &str) -> Mod {
        self.file_mod("version", "etc/version", format!("{version}\n").as_bytes())
    }

    fn package(&self, file: &str, version: &str, mods: Vec<Mod>) -> String {
        let manifest = json!({
            "version": version,
            "modules": mods.iter().map(|m| m.json.clone()).collect::<Vec<_>>(),
        })
        .to_string();
        let files: Vec<(&str, &[u8])> =
            mods.iter().map(|m| (m.entry.as_str(), m.content.as_slice())).collect();
        let path = self.env.pkg_path(file);
        write_package(&path, &manifest, &files);
        path.to_str().unwrap().to_string()
    }

    /// The version module (carrying `post`) followed by one module per service.
    fn standard(&self, file: &str, version: &str, svcs: &[(&Svc, Beh)], post: &[String]) -> String {
        let mut mods = vec![self.version_mod(version).post(post)];
        mods.extend(svcs.iter().map(|(s, b)| self.svc_mod(s, version, *b)));
        self.package(file, version, mods)
    }

    /// A post command that logs `post LABEL v=.. tx=.. cwd=.. disk=..`.
    fn post_cmd(&self, label: &str) -> String {
        format!(
            "echo \"post {label} v=$TOPE_VERSION tx=$TOPE_TX_ID cwd=$(pwd) disk=$(cat {})\" >> {}",
            self.watch().display(),
            self.log.display()
        )
    }

    // ---- running the updater

    fn set_boot(&self, n: u32) {
        std::fs::write(&self.boot_file, format!("5e1f0c3a-0000-4000-8000-{n:012}\n")).unwrap();
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = self.env.command(args);
        c.env("TOPE_BOOT_ID_FILE", &self.boot_file);
        c
    }

    fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().unwrap())
    }

    fn run_armed(&self, args: &[&str], point: &str, hit: u32) -> Run {
        Run::from(self.command(args).env("FAILPOINTS", kill_at(point, hit)).output().unwrap())
    }

    /// Runs, but gives up (kills it and fails) if it has not returned within `limit`: a hang
    /// detector, not a measurement.
    fn run_bounded(&self, args: &[&str], limit: Duration) -> Run {
        let mut child =
            self.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let deadline = Instant::now() + limit;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "{args:?} did not return within {limit:?}:\n{}\nevents:\n{}",
                    Run::from(out).describe(),
                    self.dump()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Run::from(child.wait_with_output().unwrap())
    }

    fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert_eq!(r.code, Some(0), "{args:?} failed:\n{}\nevents:\n{}", r.describe(), self.dump());
        r
    }

    /// Installs and asserts a committed report; returns it.
    fn install_ok(&self, pkg: &str) -> Value {
        let r = self.ok(&["install", pkg, "--json"]);
        let j = r.json();
        assert_eq!(j["outcome"], "committed", "{}", r.describe());
        j
    }

    fn status(&self) -> Value {
        self.ok(&["status", "--json"]).json()
    }

    fn current(&self) -> Option<String> {
        self.status()["current"]["version"].as_str().map(str::to_string)
    }

    /// `(version, boots, max_boots)` of the trial, or None.
    fn trial(&self) -> Option<(String, u64, u64)> {
        let s = self.status();
        let t = &s["trial"];
        if t.is_null() {
            return None;
        }
        Some((
            t["version"]
                .as_str()
                .unwrap_or_else(|| panic!("trial without version: {s}"))
                .to_string(),
            t["boots"].as_u64().unwrap_or_else(|| panic!("trial without boots: {s}")),
            t["max_boots"].as_u64().unwrap_or_else(|| panic!("trial without max_boots: {s}")),
        ))
    }

    fn history(&self) -> Vec<Value> {
        self.ok(&["history", "--json", "--limit", "1000"]).json().as_array().unwrap().clone()
    }

    // ---- what the services saw

    fn dump(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn events(&self) -> Vec<Ev> {
        parse_events(&self.dump())
    }

    fn events_since(&self, mark: usize) -> Vec<Ev> {
        self.events().into_iter().skip(mark).collect()
    }

    /// The version a running service process reported at its start.
    fn version_of(&self, pid: i32) -> String {
        wait_until(
            || format!("the start line of pid {pid} in the events log:\n{}", self.dump()),
            || {
                self.events()
                    .into_iter()
                    .find(|e| e.kind == "start" && e.get("pid") == pid.to_string())
                    .map(|e| e.v().to_string())
            },
        )
    }

    /// Exactly one live process of `s` runs, and it is `version`; returns its pid.
    fn assert_running(&self, s: &Svc, version: &str, ctx: &str) -> i32 {
        let pids = live(&s.name);
        assert_eq!(
            pids.len(),
            1,
            "{ctx}: expected exactly one running {} (version {version}), \
             found {pids:?}\nevents:\n{}",
            s.name,
            self.dump()
        );
        let v = self.version_of(pids[0]);
        assert_eq!(
            v,
            version,
            "{ctx}: {} (pid {}) runs version {v}, expected {version}\nevents:\n{}",
            s.name,
            pids[0],
            self.dump()
        );
        pids[0]
    }

    /// Runs `s`'s current script directly, as a child of the test (killed on drop).
    fn spawn_direct(&self, s: &Svc) -> i32 {
        let child = Command::new(self.env.path(&s.rel()))
            .args([&self.log, &self.watch()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        self.children.borrow_mut().push(child);
        self.wait_started(pid);
        pid
    }

    fn wait_started(&self, pid: i32) {
        wait_until(
            || format!("pid {pid} to log its start:\n{}", self.dump()),
            || {
                self.events()
                    .iter()
                    .any(|e| e.kind == "start" && e.get("pid") == pid.to_string())
                    .then_some(())
            },
        );
    }
}

/// The stable code and exit status of a failed transaction; with `--json` output, the report
/// says rolled back with that code.
fn assert_failed(r: &Run, exit: i32, code: &str, lab: &Lab) {
    assert_eq!(
        r.code,
        Some(exit),
        "expected exit {exit} ({code}):\n{}\nevents:\n{}",
        r.describe(),
        lab.dump()
    );
    assert_eq!(r.error_code().as_deref(), Some(code), "expected {code}:\n{}", r.describe());
    if let Ok(j) = serde_json::from_str::<Value>(r.stdout.trim())
        && j.get("outcome").is_some()
    {
        assert_eq!(
            (j["outcome"].as_str(), j["error"]["code"].as_str()),
            (Some("rolled_back"), Some(code)),
            "{}",
            r.describe()
        );
    }
}

fn assert_tree(lab: &Lab, want: &BTreeMap<String, String>, what: &str) {
    let have = tree(&lab.env.root);
    if &have != want {
        let keys: std::collections::BTreeSet<&String> = have.keys().chain(want.keys()).collect();
        let diff: Vec<String> = keys
            .into_iter()
            .filter(|k| have.get(*k) != want.get(*k))
            .map(|k| format!("  {k}: have {:?}, want {:?}", have.get(k), want.get(k)))
            .collect();
        panic!("{what}: the tree differs:\n{}\nevents:\n{}", diff.join("\n"), lab.dump());
    }
}

fn start_ticks(pid: i32) -> u64 {
    proc_stat(pid).unwrap_or_else(|| panic!("pid {pid} is gone")).start_ticks
}

// ---------------------------------------------------------------- 1. stop and start order

#[test]
fn services_are_stopped_in_descending_and_started_in_ascending_restart_order_around_the_swap() {
    let lab = Lab::new();
    // a: its script module says 5, its config module says 2: one service, order 2.
    let a = lab.svc(Some(5));
    let b = lab.svc(Some(3));
    let c = lab.svc(None);
    lab.configure("", &[&a, &b, &c], "");
    let pkg = |file: &str, version: &str| {
        let conf = lab
            .file_mod("a-conf", "etc/a.conf", format!("a conf {version}\n").as_bytes())
            .owned_by(&a.name, Some(2));
        let mods = vec![
            lab.svc_mod(&a, version, Beh::ExitOnTerm),
            lab.svc_mod(&b, version, Beh::ExitOnTerm),
            lab.svc_mod(&c, version, Beh::ExitOnTerm),
            conf,
            lab.version_mod(version),
        ];
        lab.package(file, version, mods)
    };
    let (pkg1, pkg2) = (pkg("v1.zip", V1), pkg("v2.zip", V2));

    lab.install_ok(&pkg1);
    let old: Vec<i32> =
        [&a, &b, &c].iter().map(|s| lab.assert_running(s, V1, "after installing v1")).collect();
    let mark = lab.events().len();

    lab.install_ok(&pkg2);
    let evs = lab.events_since(mark);
    let d = lab.dump();

    // Stopped in descending order (the unordered service first), each once, before the swap.
    let terms: Vec<&Ev> = evs.iter().filter(|e| e.kind == "term").collect();
    let stop_order: Vec<&str> = terms.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        stop_order,
        [c.name.as_str(), b.name.as_str(), a.name.as_str()],
        "stop order c, b, a:\n{d}"
    );
    for (t, (s, pid)) in terms.iter().zip([(&c, old[2]), (&b, old[1]), (&a, old[0])]) {
        assert_eq!(
            (t.pid(), t.v(), t.disk()),
            (pid, V1, V1),
            "{} was stopped while the old files were in place:\n{d}",
            s.name
        );
    }

    // Started once each, as the new version, with every new file in place.
    for s in [&a, &b, &c] {
        let starts: Vec<&Ev> =
            evs.iter().filter(|e| e.kind == "start" && e.name == s.name).collect();
        assert_eq!(starts.len(), 1, "{} started once:\n{d}", s.name);
        assert_eq!(
            (starts[0].v(), starts[0].disk()),
            (V2, V2),
            "{} started from the new files:\n{d}",
            s.name
        );
    }
    let last_stop = evs.iter().rposition(|e| e.kind == "term").unwrap();
    let first_start = evs.iter().position(|e| e.kind == "start").unwrap();
    assert!(last_stop < first_start, "every service is stopped before any is started:\n{d}");

    let new: Vec<i32> =
        [&a, &b, &c].iter().map(|s| lab.assert_running(s, V2, "after installing v2")).collect();
    for (s, pid) in [&a, &b, &c].iter().zip(&old) {
        assert!(!alive_as(*pid, &s.name), "the old {} (pid {pid}) is gone", s.name);
    }
    // Started in ascending order: a (2), b (3), c (unordered, last). The updater starts the
    // next one only after the previous settled, so the creation times are strictly ordered.
    let ticks: Vec<u64> = new.iter().map(|p| start_ticks(*p)).collect();
    assert!(
        ticks[0] < ticks[1] && ticks[1] < ticks[2],
        "start order a, b, c: creation ticks {ticks:?}\n{d}"
    );
    assert_eq!(lab.current().as_deref(), Some(V2));
}

// ---------------------------------------------------------------- 2. SIGKILL after the timeout

#[test]
fn a_service_that_ignores_sigterm_is_killed_after_stop_timeout_and_the_install_commits() {
    let lab = Lab::new();
    let s = lab.svc(Some(1));
    lab.configure("stop_timeout_s = 1", &[&s], "");
    let pkg1 = lab.standard("v1.zip", V1, &[(&s, Beh::IgnoreTerm)], &[]);
    let pkg2 = lab.standard("v2.zip", V2, &[(&s, Beh::ExitOnTerm)], &[]);
    lab.install_ok(&pkg1);
    let old = lab.assert_running(&s, V1, "after installing v1");
    let mark = lab.events().len();

    lab.install_ok(&pkg2);
    let evs = lab.events_since(mark);
    let d = lab.dump();
    assert_eq!(
        shorts(&evs),
        [format!("ignored {} {V1}", s.name), format!("start {} {V2}", s.name)],
        "SIGTERM (ignored), then the new version:\n{d}"
    );
    assert_eq!(
        (evs[0].pid(), evs[0].disk()),
        (old, V1),
        "the old process got SIGTERM before the swap:\n{d}"
    );
    assert_eq!(evs[1].disk(), V2);
    assert!(!alive_as(old, &s.name), "the process that ignored SIGTERM was killed");
    lab.assert_running(&s, V2, "after installing v2");
    assert_eq!(lab.current().as_deref(), Some(V2));
}

// ---------------------------------------------------------------- 3. EPERM

fn chown_tree(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
    if std::fs::symlink_metadata(p).unwrap().is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            chown_tree(&e.unwrap().path(), uid, gid);
        }
    }
}

#[test]
#[cfg_attr(
    tope_unprivileged,
    ignore = "needs root: runs a process as root and the updater as nobody; \
              run as root (README.md: Tests that need root)"
)]
fn a_process_the_updater_may_not_signal_is_process_kill_failed_and_nothing_changes() {
    const T: &str = "a_process_the_updater_may_not_signal";
    crate::support::require_root(
        T,
        "it runs a process as root and the updater as nobody (setpriv)",
    );
    const NOBODY: u32 = 65534;
    let lab = Lab::new();
    let s = lab.svc(Some(1));
    lab.configure("", &[&s], "");
    // The device runs v1 (factory files), started as root.
    lab.env.put(&s.rel(), &script(V1, Beh::ExitOnTerm), 0o755);
    lab.env.put("etc/version", format!("{V1}\n").as_bytes(), 0o644);
    let pkg2 = lab.standard("v2.zip", V2, &[(&s, Beh::ExitOnTerm)], &[]);
    chown_tree(lab.env.tmp.path(), NOBODY, NOBODY);
    let victim = lab.spawn_direct(&s);
    let t0 = tree(&lab.env.root);
    let mark = lab.events().len();

    // The updater runs as nobody: it may read /proc but not signal root's process.
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            BIN,
            "--config",
        ])
        .arg(&lab.env.config)
        .args(["install", &pkg2, "--json"])
        .env_remove("FAILPOINTS")
        .env("NO_COLOR", "1")
        .env("TOPE_BOOT_ID_FILE", &lab.boot_file)
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_failed(&r, 4, "PROCESS_KILL_FAILED", &lab);
    assert_tree(&lab, &t0, "after PROCESS_KILL_FAILED");
    assert!(leftovers(&lab.env.root).is_empty(), "{:?}", leftovers(&lab.env.root));
    assert!(alive_as(victim, &s.name), "the process it could not signal still runs");
    assert_eq!(live(&s.name), [victim], "and no second copy was started:\n{}", lab.dump());
    assert!(lab.events_since(mark).is_empty(), "the process never saw a signal:\n{}", lab.dump());
    assert_eq!(lab.current(), None, "nothing was installed");
}

// ---------------------------------------------------------------- 4. zombies

#[test]
fn a_zombie_left_by_a_parent_that_never_reaps_counts_as_gone() {
    let lab = Lab::new();
    let s = lab.svc(Some(1));
    lab.configure("", &[&s], "");
    lab.env.put(&s.rel(), &script(V1, Beh::ExitOnTerm), 0o755);
    lab.env.put("etc/version", format!("{V1}\n").as_bytes(), 0o644);
    let pkg2 = lab.standard("v2.zip", V2, &[(&s, Beh::ExitOnTerm)], &[]);

    // A parent that forks the service and never waits for it.
    let holder = Command::new(PERL)
        .args([
            "-e",
            "if (fork() == 0) { exec { $ARGV[0] } @ARGV or die \"exec: $!\" } sleep 1 while 1;",
        ])
        .arg(lab.env.path(&s.rel()))
        .args([&lab.log, &lab.watch()])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    lab.children.borrow_mut().push(holder);
    let child = wait_until(
        || format!("the forked {} to start:\n{}", s.name, lab.dump()),
        || live(&s.name).first().copied(),
    );
    lab.wait_started(child);
    let mark = lab.events().len();

    lab.install_ok(&pkg2);
    let evs = lab.events_since(mark);
    let d = lab.dump();
    assert_eq!(
        shorts(&evs),
        [format!("term {} {V1}", s.name), format!("start {} {V2}", s.name)],
        "{d}"
    );
    assert_eq!(evs[0].pid(), child, "{d}");
    assert_eq!(
        proc_stat(child).map(|st| st.state),
        Some('Z'),
        "the stopped child is still a zombie (its parent never reaps): \
         the updater treated it as gone"
    );
    let new = lab.assert_running(&s, V2, "after the install");
    assert_ne!(new, child);
}

// ---------------------------------------------------------------- 5. start failure

#[test]
fn a_service_that_does_not_come_back_rolls_the_install_back_and_restarts_the_old_versions() {
    let lab = Lab::new();
    let x = lab.svc(Some(1));
    let y = lab.svc(Some(2));
    lab.configure("start_timeout_s = 5", &[&x, &y], "");
    let pkg1 = lab.standard("v1.zip", V1, &[(&x, Beh::ExitOnTerm), (&y, Beh::ExitOnTerm)], &[]);
    let pkg2 = lab.standard("v2.zip", V2, &[(&x, Beh::ExitOnTerm), (&y, Beh::ExitAtOnce)], &[]);
    lab.install_ok(&pkg1);
    let t1 = tree(&lab.env.root);
    let old_x = lab.assert_running(&x, V1, "v1");
    let old_y = lab.assert_running(&y, V1, "v1");
    let mark = lab.events().len();

    let r = lab.run(&["install", &pkg2, "--json"]);
    assert_failed(&r, 4, "SERVICE_START_FAILED", &lab);
    assert_tree(&lab, &t1, "after the failed start");
    assert!(leftovers(&lab.env.root).is_empty());
    let evs = lab.events_since(mark);
    let d = lab.dump();

    // x came up as v2, so the rollback stopped it (new files still there) before restoring.
    let xs: Vec<Ev> = evs.iter().filter(|e| e.name == x.name).cloned().collect();
    assert_eq!(
        shorts(&xs),
        [
            format!("term {} {V1}", x.name),
            format!("start {} {V2}", x.name),
            format!("term {} {V2}", x.name),
            format!("start {} {V1}", x.name)
        ],
        "{d}"
    );
    assert_eq!(
        xs.iter().map(Ev::disk).collect::<Vec<_>>(),
        [V1, V2, V2, V1],
        "stopped before the swap, started after it, \
         stopped before the restore, started after it:\n{d}"
    );
    assert_eq!(xs[0].pid(), old_x);

    // y: stopped, its v2 died at once (perhaps more than once), then v1 came back.
    let ys: Vec<Ev> = evs.iter().filter(|e| e.name == y.name).cloned().collect();
    assert_eq!(
        (ys[0].short(), ys[0].pid(), ys[0].disk()),
        (format!("term {} {V1}", y.name), old_y, V1),
        "{d}"
    );
    assert!(
        ys.iter().any(|e| e.short() == format!("exit {} {V2}", y.name)),
        "the new y was started and died:\n{d}"
    );
    let last = ys.last().unwrap();
    assert_eq!((last.short(), last.disk()), (format!("start {} {V1}", y.name), V1), "{d}");
    assert!(!ys.iter().any(|e| e.short() == format!("term {} {V2}", y.name)), "{d}");

    lab.assert_running(&x, V1, "after the rollback");
    lab.assert_running(&y, V1, "after the rollback");
    assert_eq!(lab.current().as_deref(), Some(V1));
    assert!(lab.status()["in_flight"].is_null());
}

// ---------------------------------------------------------------- 6. post commands

#[test]
fn post_commands_run_in_manifest_order_after_the_swap_between_the_stop_and_the_start() {
    let lab = Lab::new();
    let s = lab.svc(Some(1));
    lab.configure("", &[&s], "");
    let pkg1 = lab.standard("v1.zip", V1, &[(&s, Beh::ExitOnTerm)], &[]);
    // Module order: "version" (p1, p2) before "svc-..." (p3); by name it would be the other way.
    let mods = vec![
        lab.version_mod(V2).post(&[lab.post_cmd("p1"), lab.post_cmd("p2")]),
        lab.svc_mod(&s, V2, Beh::ExitOnTerm).post(&[lab.post_cmd("p3")]),
    ];
    let pkg2 = lab.package("v2.zip", V2, mods);
    lab.install_ok(&pkg1);
    let old = lab.assert_running(&s, V1, "v1");
    let mark = lab.events().len();

    let report = lab.install_ok(&pkg2);
    let tx = report["tx"].as_u64().unwrap().to_string();
    let evs = lab.events_since(mark);
    let d = lab.dump();
    assert_eq!(
        shorts(&evs),
        [
            format!("term {} {V1}", s.name),
            format!("post p1 {V2}"),
            format!("post p2 {V2}"),
            format!("post p3 {V2}"),
            format!("start {} {V2}", s.name),
        ],
        "stop, the post commands in order, start:\n{d}"
    );
    assert_eq!(evs[0].pid(), old);
    for p in &evs[1..4] {
        assert_eq!(
            (p.get("tx"), p.get("cwd"), p.disk()),
            (tx.as_str(), "/", V2),
            "TOPE_TX_ID, cwd / and the new files: {p:?}"
        );
    }
    lab.assert_running(&s, V2, "after the install");
    assert_eq!(lab.current().as_deref(), Some(V2));
}

#[test]
fn a_failing_post_command_rolls_back_to_the_old_files_and_the_old_services() {
    let lab = Lab::new();
    let s = lab.svc(Some(1));
    lab.configure("", &[&s], "");
    let pkg1 = lab.standard("v1.zip", V1, &[(&s, Beh::ExitOnTerm)], &[]);
    let pkg2 = lab.standard(
        "v2.zip",
        V2,
        &[(&s, Beh::ExitOnTerm)],
        &[lab.post_cmd("p1"), "exit 1".into(), lab.post_cmd("p3")],
    );
    lab.install_ok(&pkg1);
    let t1 = tree(&lab.env.root);
    lab.assert_running(&s, V1, "v1");
    let mark = lab.events().len();

    let r = lab.run(&["install", &pkg2, "--json"]);
    assert_failed(&r, 4, "POST_CMD_FAILED", &lab);
    assert_tree(&lab, &t1, "after the failed post command");
    let evs = lab.events_since(mark);
    let d = lab.dump();
    assert_eq!(
        shorts(&evs),
        [
            format!("term {} {V1}", s.name),
            format!("post p1 {V2}"),
            format!("start {} {V1}", s.name)
        ],
        "p1 ran, p3 never; the old version came back (the rollback runs no post commands):\n{d}"
    );
    assert_eq!(evs[2].disk(), V1, "restarted on the restored files:\n{d}");
    lab.assert_running(&s, V1, "after the rollback");
    assert_eq!(lab.current().as_deref(), Some(V1));
}

#[test]
fn a_post_command_exceeding_post_cmd_timeout_s_is_post_cmd_failed() {
    let lab = Lab::new();
    let s = lab.svc(Some(1));
    lab.configure("post_cmd_timeout_s = 1", &[&s], "");
    let (hang_name, hang) = lab.sleeper("hg");
    let pkg1 = lab.standard("v1.zip", V1, &[(&s, Beh::ExitOnTerm)], &[]);
    let pkg2 = lab.standard(
        "v2.zip",
        V2,
        &[(&s, Beh::ExitOnTerm)],
        &[lab.post_cmd("p1"), format!("{} 3600", hang.display())],
    );
    lab.install_ok(&pkg1);
    let t1 = tree(&lab.env.root);
    lab.assert_running(&s, V1, "v1");
    let mark = lab.events().len();

    // The command would run for an hour; the install must give up on it long before.
    let r = lab.run_bounded(&["install", &pkg2, "--json"], Duration::from_secs(300));
    assert_failed(&r, 4, "POST_CMD_FAILED", &lab);
    assert_tree(&lab, &t1, "after the timed-out post command");
    let evs = lab.events_since(mark);
    assert_eq!(
        shorts(&evs),
        [
            format!("term {} {V1}", s.name),
            format!("post p1 {V2}"),
            format!("start {} {V1}", s.name)
        ],
        "{}",
        lab.dump()
    );
    lab.assert_running(&s, V1, "after the rollback");
    assert!(
        live(&hang_name).is_empty(),
        "the timed-out post command was killed, not left running: {:?}",
        live(&hang_name)
    );
}

// ---------------------------------------------------------------- 7. no start command

#[test]
fn a_process_name_without_a_start_command_is_rejected_before_anything_is_touched() {
    let lab = Lab::new();
    let s = lab.svc(Some(1));
    lab.configure("", &[&s], "");
    let pkg1 = lab.standard("v1.zip", V1, &[(&s, Beh::ExitOnTerm)], &[]);
    lab.install_ok(&pkg1);
    let pid = lab.assert_running(&s, V1, "v1");
    let t1 = tree(&lab.env.root);
    let mark = lab.events().len();

    let ghost = unique("gh");
    let mods = vec![
        lab.version_mod(V2).post(&[lab.post_cmd("p1")]),
        lab.svc_mod(&s, V2, Beh::ExitOnTerm),
        lab.file_mod("ghost", "etc/ghost.conf", b"ghost\n").owned_by(&ghost, Some(2)),
    ];
    let pkg2 = lab.package("v2.zip", V2, mods);
    let r = lab.run(&["install", &pkg2]);
    assert_eq!(r.code, Some(3), "rejected, nothing touched:\n{}", r.describe());
    assert_eq!(r.error_code().as_deref(), Some("SERVICE_START_FAILED"), "{}", r.describe());
    assert!(r.stderr.contains(&ghost), "the message names the service:\n{}", r.describe());
    assert_tree(&lab, &t1, "after the rejection");
    assert!(
        lab.events_since(mark).is_empty(),
        "no service was stopped, no post command ran:\n{}",
        lab.dump()
    );
    assert!(alive_as(pid, &s.name), "the running service was left alone");
    assert_eq!(lab.current().as_deref(), Some(V1));
}

// ---------------------------------------------------------------- 8. rollback

#[test]
fn rollback_stops_and_starts_the_services_owning_the_paths_it_changes_and_runs_no_post_commands() {
    let lab = Lab::new();
    let a = lab.svc(Some(1));
    let b = lab.svc(Some(2));
    lab.configure("", &[&a, &b], "");
    let svcs = [(&a, Beh::ExitOnTerm), (&b, Beh::ExitOnTerm)];
    let pkg1 = lab.standard("v1.zip", V1, &svcs, &[lab.post_cmd("p1")]);
    let pkg2 = lab.standard("v2.zip", V2, &svcs, &[lab.post_cmd("p1")]);
    lab.install_ok(&pkg1);
    let t1 = tree(&lab.env.root);
    lab.install_ok(&pkg2);
    let (pa, pb) = (lab.assert_running(&a, V2, "v2"), lab.assert_running(&b, V2, "v2"));
    let mark = lab.events().len();

    let r = lab.ok(&["rollback", "--json"]);
    assert_eq!(r.json()["outcome"], "committed", "{}", r.describe());
    assert_tree(&lab, &t1, "after the rollback");
    let evs = lab.events_since(mark);
    let d = lab.dump();
    let terms: Vec<&Ev> = evs.iter().filter(|e| e.kind == "term").collect();
    assert_eq!(
        terms.iter().map(|e| (e.name.as_str(), e.pid(), e.v(), e.disk())).collect::<Vec<_>>(),
        [(b.name.as_str(), pb, V2, V2), (a.name.as_str(), pa, V2, V2)],
        "stopped in descending order before the files were restored:\n{d}"
    );
    let mut starts: Vec<(String, String, String)> = evs
        .iter()
        .filter(|e| e.kind == "start")
        .map(|e| (e.name.clone(), e.v().to_string(), e.disk().to_string()))
        .collect();
    starts.sort();
    let mut want = vec![
        (a.name.clone(), V1.to_string(), V1.to_string()),
        (b.name.clone(), V1.to_string(), V1.to_string()),
    ];
    want.sort();
    assert_eq!(starts, want, "each started once, as v1, on the restored files:\n{d}");
    assert!(evs.iter().all(|e| e.kind != "post"), "a rollback runs no post commands:\n{d}");
    let last_stop = evs.iter().rposition(|e| e.kind == "term").unwrap();
    let first_start = evs.iter().position(|e| e.kind == "start").unwrap();
    assert!(last_stop < first_start, "{d}");
    let (na, nb) = (
        lab.assert_running(&a, V1, "after the rollback"),
        lab.assert_running(&b, V1, "after the rollback"),
    );
    assert!(start_ticks(na) < start_ticks(nb), "started in ascending order:\n{d}");
    assert_eq!(lab.current().as_deref(), Some(V1));
}

// ---------------------------------------------------------------- 11. self-update

#[test]
fn a_package_replacing_the_running_updater_binary_commits_and_the_updater_survives() {
    let lab = Lab::new();
    // The updater's own copy, run from inside the allowed root: its comm is `name`.
    let name = unique("tu");
    lab.track(&name);
    let me = lab.env.path(&format!("bin/{name}"));
    std::fs::create_dir_all(me.parent().unwrap()).unwrap();
    std::fs::copy(BIN, &me).unwrap();
    std::fs::set_permissions(&me, std::fs::Permissions::from_mode(0o755)).unwrap();
    let old_bytes = std::fs::read(&me).unwrap();
    // Another process with the same comm (a sleep copy): that one must be stopped.
    let sibling = lab.helpers.join(&name);
    std::fs::copy("/usr/bin/sleep", &sibling).unwrap();
    let start = format!("{} 3600", sibling.display());
    lab.configure("", &[], &format!("\n[services.{name}]\nstart = {start:?}\n"));
    let other = Command::new(&sibling).arg("3600").stdin(Stdio::null()).spawn().unwrap();
    let other_pid = other.id() as i32;
    lab.children.borrow_mut().push(other);
    wait_until(
        || format!("the sibling {name} to run"),
        || alive_as(other_pid, &name).then_some(()),
    );

    let new_bytes = b"#!/bin/sh\necho 'tope-updater, the next build'\n".to_vec();
    let manifest = json!({
        "version": V2,
        "modules": [{
            "name": "updater",
            "src": "updater",
            "dst": me.to_str().unwrap(),
            "process_name": name,
            "mode": "0755",
            "blake3": blake3_hex(&new_bytes),
        }],
    })
    .to_string();
    let pkg = lab.env.pkg_path("self.zip");
    write_package(&pkg, &manifest, &[("updater", &new_bytes)]);

    let out = Command::new(&me)
        .arg("--config")
        .arg(&lab.env.config)
        .args(["install", pkg.to_str().unwrap(), "--json"])
        .env_remove("FAILPOINTS")
        .env("NO_COLOR", "1")
        .env("TOPE_BOOT_ID_FILE", &lab.boot_file)
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(
        (r.code, r.signal),
        (Some(0), None),
        "the updater finished by itself:\n{}",
        r.describe()
    );
    assert_eq!(r.json()["outcome"], "committed", "{}", r.describe());
    assert_eq!(std::fs::read(&me).unwrap(), new_bytes, "the new bytes are in place");
    assert_ne!(old_bytes, new_bytes);
    assert!(!alive_as(other_pid, &name), "the other process named {name} was stopped");
    // The updater is not the service: after the swap the service is started again.
    let started = live(&name);
    assert_eq!(started.len(), 1, "the start command ran once after the swap: {started:?}");
    assert_ne!(started[0], other_pid);
    assert_eq!(lab.current().as_deref(), Some(V2));
    assert!(lab.status()["in_flight"].is_null());
}

// ---------------------------------------------------------------- crash points and trials

#[cfg(not(feature = "failpoints"))]
#[test]
fn service_crash_and_trial_tests_need_the_failpoints_feature() {
    panic!(
        "the service crash-point and trial-install tests need the crash points and the \
         TOPE_BOOT_ID_FILE seam: run `cargo test --features failpoints --test it services`"
    );
}

#[cfg(feature = "failpoints")]
mod armed {
    use super::*;
    use tope_updater::failpoint::SERVICE_CRASH_POINTS;

    // ---- 9. trial installs

    /// v1 installed and confirmed, then v2 installed as a trial; service `s` runs v2.
    fn trial_lab(
        max_boots: u32,
    ) -> (Lab, Svc, BTreeMap<String, String>, BTreeMap<String, String>, String, u64) {
        let lab = Lab::new();
        let s = lab.svc(Some(1));
        lab.configure(
            &format!("confirm_required = true\nmax_trial_boots = {max_boots}"),
            &[&s],
            "",
        );
        let pkg1 = lab.standard("v1.zip", V1, &[(&s, Beh::ExitOnTerm)], &[]);
        let pkg2 = lab.standard("v2.zip", V2, &[(&s, Beh::ExitOnTerm)], &[]);
        lab.install_ok(&pkg1);
        lab.ok(&["confirm"]);
        let t1 = tree(&lab.env.root);
        let tx = lab.install_ok(&pkg2)["tx"].as_u64().unwrap();
        let t2 = tree(&lab.env.root);
        lab.assert_running(&s, V2, "after the trial install");
        (lab, s, t1, t2, pkg2, tx)
    }

    #[test]
    fn an_unconfirmed_trial_counts_boots_and_is_rolled_back_when_they_are_used_up() {
        let (lab, s, t1, t2, pkg2, tx) = trial_lab(2);
        let st = lab.status();
        assert_eq!(
            st["trial"],
            json!({"tx": tx, "version": V2, "boots": 1, "max_boots": 2}),
            "{st}"
        );
        let pid = lab.assert_running(&s, V2, "trial");
        let mark = lab.events().len();

        // Same boot: nothing changes.
        lab.ok(&["recover"]);
        assert_eq!(
            lab.trial(),
            Some((V2.into(), 1, 2)),
            "a recover in the same boot counts nothing"
        );
        assert_tree(&lab, &t2, "recover in the install's boot");

        // Second boot: counted, still installed.
        lab.set_boot(2);
        lab.ok(&["recover"]);
        assert_eq!(lab.trial(), Some((V2.into(), 2, 2)));
        assert_eq!(lab.current().as_deref(), Some(V2));
        assert_tree(&lab, &t2, "recover in the second boot");
        lab.ok(&["recover"]);
        assert_eq!(lab.trial(), Some((V2.into(), 2, 2)), "the same boot is counted once");
        assert!(
            lab.events_since(mark).is_empty(),
            "counting boots touches no service:\n{}",
            lab.dump()
        );
        assert!(alive_as(pid, &s.name));

        // Third boot: the boots are used up, the trial is rolled back.
        lab.set_boot(3);
        let r = lab.run(&["recover", "--json"]);
        assert_eq!(
            r.code,
            Some(4),
            "the install failed its trial and was rolled back:\n{}",
            r.describe()
        );
        assert_eq!(r.json()["result"], "trial_expired", "{}", r.describe());
        assert_tree(&lab, &t1, "after the trial rollback");
        assert_eq!(lab.current().as_deref(), Some(V1));
        assert_eq!(lab.trial(), None);
        let h = lab.history();
        assert!(
            h[0]["kind"].get("Rollback").is_some(),
            "the newest transaction is a rollback: {}",
            h[0]
        );
        assert_eq!(h[0]["phase"], "Committed", "{}", h[0]);
        let evs = lab.events_since(mark);
        let d = lab.dump();
        assert_eq!(
            shorts(&evs),
            [format!("term {} {V2}", s.name), format!("start {} {V1}", s.name)],
            "{d}"
        );
        assert_eq!((evs[0].pid(), evs[0].disk(), evs[1].disk()), (pid, V2, V1), "{d}");
        lab.assert_running(&s, V1, "after the trial rollback");

        // Remembered as failed: not installed again without --force.
        let r = lab.run(&["install", &pkg2]);
        assert_eq!(r.code, Some(3), "{}", r.describe());
        assert_eq!(r.error_code().as_deref(), Some("VALIDATION_ERROR"), "{}", r.describe());
        assert!(r.stderr.contains("--force"), "{}", r.describe());
        assert_tree(&lab, &t1, "refused reinstall");
        let r = lab.run(&["recover", "--json"]);
        assert_eq!(
            (r.code, r.json()["result"].as_str()),
            (Some(0), Some("nothing")),
            "{}",
            r.describe()
        );
    }

    #[test]
    fn confirm_ends_the_trial_and_confirm_without_a_trial_is_a_no_op() {
        let lab = Lab::new();
        lab.configure("confirm_required = true\nmax_trial_boots = 1", &[], "");
        let r = lab.ok(&["confirm"]);
        assert!(r.stdout.contains("nothing to confirm"), "{}", r.describe());
        let r = lab.ok(&["confirm", "--json"]);
        let _ = r.json();

        let (lab, s, _t1, t2, _pkg2, _tx) = trial_lab(1);
        let pid = lab.assert_running(&s, V2, "trial");
        assert_eq!(lab.trial(), Some((V2.into(), 1, 1)));
        lab.ok(&["confirm"]);
        assert_eq!(lab.trial(), None, "confirmed");
        for boot in 2..5 {
            lab.set_boot(boot);
            lab.ok(&["recover"]);
            assert_tree(&lab, &t2, &format!("boot {boot} after confirm"));
            assert_eq!(lab.current().as_deref(), Some(V2));
        }
        assert!(alive_as(pid, &s.name), "the confirmed version's service was left alone");
        let r = lab.ok(&["confirm"]);
        assert!(r.stdout.contains("nothing to confirm"), "{}", r.describe());
        assert_eq!(lab.trial(), None);
    }

    #[test]
    fn max_trial_boots_1_rolls_back_at_the_next_boot() {
        let lab = Lab::new();
        lab.configure("confirm_required = true\nmax_trial_boots = 1", &[], "");
        lab.env.put("etc/version", b"factory\n", 0o644);
        let t0 = tree(&lab.env.root);
        let pkg = lab.package("v1.zip", V1, vec![lab.version_mod(V1)]);
        lab.install_ok(&pkg);
        assert_eq!(lab.trial(), Some((V1.into(), 1, 1)));
        lab.ok(&["recover"]);
        assert_eq!(lab.current().as_deref(), Some(V1), "same boot: kept");
        lab.set_boot(2);
        let r = lab.run(&["recover"]);
        assert_eq!(
            r.code,
            Some(4),
            "the install failed its trial and was rolled back:\n{}",
            r.describe()
        );
        assert_tree(&lab, &t0, "rolled back at the next boot");
        assert_eq!((lab.current(), lab.trial()), (None, None));
    }

    #[test]
    fn a_kill_right_after_a_boot_is_counted_does_not_count_it_twice() {
        let (lab, s, t1, t2, _pkg2, _tx) = trial_lab(2);
        assert!(SERVICE_CRASH_POINTS.contains(&"trial.boot_counted"));
        lab.set_boot(2);
        let r = lab.run_armed(&["recover"], "trial.boot_counted", 1);
        assert_eq!(r.signal, Some(9), "killed at trial.boot_counted:\n{}", r.describe());
        assert!(r.stderr.contains("crash point trial.boot_counted: SIGKILL"), "{}", r.describe());
        lab.ok(&["recover"]);
        assert_eq!(
            lab.trial(),
            Some((V2.into(), 2, 2)),
            "the second boot was counted exactly once"
        );
        assert_tree(&lab, &t2, "still the trial version");
        lab.assert_running(&s, V2, "after recover");

        lab.set_boot(3);
        let r = lab.run(&["recover"]);
        assert_eq!(r.code, Some(4), "{}", r.describe());
        assert_tree(&lab, &t1, "the third boot rolls the trial back");
        assert_eq!(lab.current().as_deref(), Some(V1));
        lab.assert_running(&s, V1, "after the trial rollback");
    }

    // ---- 10. crash points inside the service steps

    /// Installs v1 (services a and b, two post commands), kills the v2 install at the `hit`-th
    /// pass through `point`, runs `recover`, and checks: the tree is all v1 or all v2, nothing
    /// in flight, the current version matches, each service runs exactly once as the version
    /// on disk, and no post command ran twice unless killed between running and journaling.
    /// With `failing_start`, v2's b exits at once, so the point is reached in the rollback.
    fn crash_case(point: &str, hit: u32, failing_start: bool) {
        assert!(SERVICE_CRASH_POINTS.contains(&point), "{point} is not in SERVICE_CRASH_POINTS");
        let ctx = format!("killed at {point}#{hit}");
        let lab = Lab::new();
        let a = lab.svc(Some(1));
        let b = lab.svc(Some(2));
        lab.configure("start_timeout_s = 5", &[&a, &b], "");
        let post = [lab.post_cmd("p1"), lab.post_cmd("p2")];
        let pkg1 =
            lab.standard("v1.zip", V1, &[(&a, Beh::ExitOnTerm), (&b, Beh::ExitOnTerm)], &post);
        let b2 = if failing_start { Beh::ExitAtOnce } else { Beh::ExitOnTerm };
        let pkg2 = lab.standard("v2.zip", V2, &[(&a, Beh::ExitOnTerm), (&b, b2)], &post);
        lab.install_ok(&pkg1);
        lab.assert_running(&a, V1, "v1");
        lab.assert_running(&b, V1, "v1");
        let t1 = tree(&lab.env.root);
        // v2 changes the content of the same three files; modes stay (0755 scripts, 0644).
        let mut t2 = t1.clone();
        for (rel, content) in [
            (a.rel(), script(V2, Beh::ExitOnTerm)),
            (b.rel(), script(V2, b2)),
            ("etc/version".to_string(), format!("{V2}\n").into_bytes()),
        ] {
            let old = t2.get(&rel).unwrap_or_else(|| panic!("{rel} not in {t1:?}")).clone();
            let mode = old.split(' ').nth(1).unwrap();
            t2.insert(rel, format!("file {mode} {}", blake3_hex(&content)));
        }
        let mark = lab.events().len();

        let r = lab.run_armed(&["install", &pkg2], point, hit);
        assert_eq!(
            r.signal,
            Some(9),
            "{ctx}: the point was never reached (or fewer times):\n{}\nevents:\n{}",
            r.describe(),
            lab.dump()
        );
        assert!(
            r.stderr.contains(&format!("crash point {point}: SIGKILL")),
            "{ctx}: killed, but not there:\n{}",
            r.describe()
        );

        let rec = lab.run(&["recover", "--json"]);
        let have = tree(&lab.env.root);
        let (version, exit) = if have == t1 {
            (V1, 4)
        } else if have == t2 {
            (V2, 0)
        } else {
            assert_tree(
                &lab,
                &t2,
                &format!("{ctx}: after recover the tree is neither all v1 nor all v2; against v2"),
            );
            unreachable!()
        };
        assert_eq!(
            rec.code,
            Some(exit),
            "{ctx}: recover ended at {version}:\n{}\nevents:\n{}",
            rec.describe(),
            lab.dump()
        );
        if failing_start {
            assert_eq!(version, V1, "{ctx}: v2 cannot start, so the end is v1");
        } else if !point.starts_with("enter.ServicesStopped")
            && !point.starts_with("services.stopped")
        {
            // SPEC §3: a transaction that had swapped resumes forward (recovery = "resume").
            assert_eq!(version, V2, "{ctx}: the files had been swapped, so recover resumes to v2");
        }
        let st = lab.status();
        assert!(st["in_flight"].is_null(), "{ctx}: {st}");
        assert_eq!(st["current"]["version"], version, "{ctx}: {st}");
        let pa = lab.assert_running(&a, version, &ctx);
        let pb = lab.assert_running(&b, version, &ctx);

        let evs = lab.events_since(mark);
        let count = |label: &str| {
            evs.iter().filter(|e| e.kind == "post" && e.name == label && e.v() == V2).count()
        };
        if version == V2 {
            let p1_max = if point == "post_cmd.ran" && hit == 1 { 2 } else { 1 };
            assert!(
                (1..=p1_max).contains(&count("p1")),
                "{ctx}: p1 ran {} times\n{}",
                count("p1"),
                lab.dump()
            );
            let p2_max = if point == "post_cmd.ran" && hit == 2 { 2 } else { 1 };
            assert!(
                (1..=p2_max).contains(&count("p2")),
                "{ctx}: p2 ran {} times\n{}",
                count("p2"),
                lab.dump()
            );
            for p in evs.iter().filter(|e| e.kind == "post") {
                assert_eq!(p.disk(), V2, "{ctx}: post commands run on the new files: {p:?}");
            }
        }

        // A second recover has nothing to do and leaves the services alone.
        let again = lab.run(&["recover", "--json"]);
        assert_eq!(
            (again.code, again.json()["result"].as_str()),
            (Some(0), Some("nothing")),
            "{ctx}: {}",
            again.describe()
        );
        assert!(alive_as(pa, &a.name) && alive_as(pb, &b.name), "{ctx}: the services still run");
    }

    /// The journal is lost while an install has its services stopped and is half swapped:
    /// `recover` rolls back from the plan copy, whose history is unknown, so it must treat the
    /// services as stopped and start them again on the old files.
    #[test]
    fn after_journal_loss_mid_swap_recover_restores_the_files_and_restarts_the_services() {
        let lab = Lab::new();
        let a = lab.svc(Some(1));
        let b = lab.svc(Some(2));
        lab.configure("start_timeout_s = 5", &[&a, &b], "");
        let pkg1 = lab.standard("v1.zip", V1, &[(&a, Beh::ExitOnTerm), (&b, Beh::ExitOnTerm)], &[]);
        let pkg2 = lab.standard("v2.zip", V2, &[(&a, Beh::ExitOnTerm), (&b, Beh::ExitOnTerm)], &[]);
        lab.install_ok(&pkg1);
        let t1 = tree(&lab.env.root);
        let r = lab.run_armed(&["install", &pkg2], "swap.file", 1);
        assert_eq!(r.signal, Some(9), "never reached swap.file:\n{}", r.describe());
        assert!(
            live(&a.name).is_empty() && live(&b.name).is_empty(),
            "the services were stopped before the swap"
        );
        std::fs::remove_file(lab.env.state.join("journal.redb")).unwrap();

        let rec = lab.run(&["recover"]);
        assert_eq!(rec.code, Some(4), "{}", rec.describe());
        assert_eq!(rec.error_code().as_deref(), Some("JOURNAL_CORRUPT"), "{}", rec.describe());
        assert_eq!(tree(&lab.env.root), t1, "the files are not all old again");
        lab.assert_running(&a, V1, "after recover from the plan copy");
        lab.assert_running(&b, V1, "after recover from the plan copy");
    }

    macro_rules! crash_tests {
        ($($test:ident: $point:literal, $hit:literal, $failing:literal;)*) => {
            $(
                #[test]
                fn $test() {
                    crash_case($point, $hit, $failing);
                }
            )*

            /// Every registered service crash point has a kill test (the crash tests above
            /// assert that each kill really happened); `trial.boot_counted` has its own test.
            #[test]
            fn every_service_crash_point_has_a_kill_test() {
                let mut covered: std::collections::BTreeSet<&str> =
                    [$($point),*].into_iter().collect();
                covered.insert("trial.boot_counted");
                let all: std::collections::BTreeSet<&str> =
                    SERVICE_CRASH_POINTS.iter().copied().collect();
                assert_eq!(covered, all, "service crash points without a kill test");
            }
        };
    }

    crash_tests! {
        kill_on_entering_services_stopped: "enter.ServicesStopped", 1, false;
        kill_after_the_first_service_stopped: "services.stopped_one", 1, false;
        kill_after_the_last_service_stopped: "services.stopped_one", 2, false;
        kill_on_entering_post_commands: "enter.PostCommands", 1, false;
        kill_after_the_first_post_command_ran_before_it_was_journaled: "post_cmd.ran", 1, false;
        kill_after_the_second_post_command_ran_before_it_was_journaled: "post_cmd.ran", 2, false;
        kill_after_the_first_post_command_was_journaled_reruns_only_the_second:
            "post_cmd.recorded", 1, false;
        kill_after_the_last_post_command_was_journaled: "post_cmd.recorded", 2, false;
        kill_on_entering_services_started: "enter.ServicesStarted", 1, false;
        kill_after_the_first_service_started: "services.started_one", 1, false;
        kill_after_the_last_service_started: "services.started_one", 2, false;
        kill_after_a_failed_start_rolled_back_and_restarted_the_old_services:
            "rollback.services_started", 1, true;
    }
}
