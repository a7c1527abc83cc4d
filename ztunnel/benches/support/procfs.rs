//! The proxy processes the benchmarks run: what they read about them from /proc (resident memory,
//! CPU time), and where the baselines' programs are installed. Shared by the ztunnel and waypoint
//! benchmarks, which include this file.

#![allow(dead_code, unreachable_pub)] // each benchmark uses part of it

use std::path::{Path, PathBuf};
use std::time::Duration;

/// `pid`'s CPU time so far, user and system, over all its threads, living and exited; zero if
/// the process is gone. Linux counts it in clock ticks of 10 ms (USER_HZ is 100).
pub fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u32 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u32>().ok())
        .sum();
    Duration::from_millis(10) * ticks
}

/// `pid`'s resident set in bytes; zero if the process is gone.
pub fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A baseline program (nginx, haproxy) where Debian and local installs put it.
pub fn which(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}
