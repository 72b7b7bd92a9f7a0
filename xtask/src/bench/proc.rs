//! What a server process costs, read from `/proc`: peak resident memory (`VmHWM` of
//! `/proc/PID/status`) and CPU time (`utime + stime` of `/proc/PID/stat`), summed over the
//! process and its descendants (nginx's workers, Varnish's child).

use std::path::Path;
use std::sync::OnceLock;

/// CPU time and memory of a process tree at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// User + system CPU seconds so far, summed over the tree.
    pub cpu_seconds: f64,
    /// Peak resident set (`VmHWM`) since the start or the last [`reset_peak`], KiB, summed
    /// over the tree (shared pages count once per process: an upper bound for multi-process
    /// servers).
    pub peak_rss_kib: u64,
    /// Resident set now (`VmRSS`), KiB, summed over the tree.
    pub rss_kib: u64,
    /// Proportional set size now (`Pss` of `smaps_rollup`), KiB, summed over the tree: shared
    /// pages split between the processes sharing them.
    pub pss_kib: u64,
    /// Number of processes in the tree.
    pub processes: usize,
}

/// `pid` and every live descendant of it.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(stat) = read(&entry.path().join("stat"))
                .as_deref()
                .and_then(parse_stat)
            {
                parents.push((child, stat.ppid));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        for &(child, ppid) in &parents {
            if ppid == parent && !out.contains(&child) {
                out.push(child);
            }
        }
        i += 1;
    }
    out
}

/// Usage of `pid` and its descendants now.
pub fn usage(pid: u32) -> Usage {
    let pids = tree(pid);
    let mut u = Usage {
        processes: pids.len(),
        ..Usage::default()
    };
    let tck = clock_ticks() as f64;
    for p in pids {
        let base = Path::new("/proc").join(p.to_string());
        if let Some(stat) = read(&base.join("stat")).as_deref().and_then(parse_stat) {
            u.cpu_seconds += (stat.utime + stat.stime) as f64 / tck;
        }
        if let Some(status) = read(&base.join("status")) {
            u.peak_rss_kib += status_kib(&status, "VmHWM:").unwrap_or(0);
            u.rss_kib += status_kib(&status, "VmRSS:").unwrap_or(0);
        }
        if let Some(rollup) = read(&base.join("smaps_rollup")) {
            u.pss_kib += status_kib(&rollup, "Pss:").unwrap_or(0);
        }
    }
    u
}

/// Resets the peak-RSS mark of `pid` and its descendants to their current RSS (writes `5` to
/// `/proc/PID/clear_refs`), so the next [`usage`] reports the peak since now. Best effort:
/// kernels or permissions that refuse it leave the lifetime peak.
pub fn reset_peak(pid: u32) {
    for p in tree(pid) {
        let _ = std::fs::write(format!("/proc/{p}/clear_refs"), "5");
    }
}

/// Whether `pid` is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    read(Path::new(&format!("/proc/{pid}/stat")))
        .as_deref()
        .and_then(parse_stat)
        .is_some_and(|s| s.state != 'Z')
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The fields of `/proc/PID/stat` the bench needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Process state (`R`, `S`, `Z`, …).
    pub state: char,
    /// Parent process id.
    pub ppid: u32,
    /// User-mode CPU time, clock ticks.
    pub utime: u64,
    /// Kernel-mode CPU time, clock ticks.
    pub stime: u64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) may contain spaces and parentheses,
/// so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) … utime(14) stime(15), i.e. indexes 0, 1, 11, 12.
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
    })
}

/// A `Name:   1234 kB` line of `/proc/PID/status` or `smaps_rollup`, in KiB.
pub fn status_kib(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `getconf CLK_TCK` (100 on every Linux the bench is likely to meet).
fn clock_ticks() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_stat_with_awkward_names() {
        let line = "4242 (nginx: worker (x) ) S 4200 4200 4200 0 -1 4194624 1 0 0 0 \
                    731 95 0 0 20 0 1 0 100 1000000 200 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            s,
            Stat {
                state: 'S',
                ppid: 4200,
                utime: 731,
                stime: 95
            }
        );
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("1 (x) S 0").is_none());
    }

    #[test]
    fn parses_status_lines() {
        let status = "Name:\ttollgate\nVmPeak:\t  900 kB\nVmHWM:\t   51234 kB\nVmRSS:\t 40000 kB\n";
        assert_eq!(status_kib(status, "VmHWM:"), Some(51234));
        assert_eq!(status_kib(status, "VmRSS:"), Some(40000));
        assert_eq!(status_kib(status, "Pss:"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(tree(me).contains(&me));
        let u = usage(me);
        assert!(u.peak_rss_kib > 0);
        assert!(u.processes >= 1);
    }
}
