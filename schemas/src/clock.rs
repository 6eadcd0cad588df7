//! Calendar text for times on the wire and in timelines (UTC), without a time-zone database:
//! OpenSIPS prints `uptime` with C's `ctime()` and `dlg_list` dates as `YYYY-MM-DD HH:MM:SS`.

/// Splits Unix seconds into (year, month, day, hour, minute, second, days since the epoch).
pub fn civil(unix: u64) -> (i64, u32, u32, u64, u64, u64, u64) {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, secs / 3600, secs % 3600 / 60, secs % 60, days)
}

/// `YYYY-MM-DD HH:MM:SS`.
pub fn datetime(unix: u64) -> String {
    let (y, mo, d, h, mi, s, _) = civil(unix);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

/// `YYYY-MM-DD HH:MM:SS.mmm` from milliseconds.
pub fn datetime_ms(unix_ms: u64) -> String {
    format!("{}.{:03}", datetime(unix_ms / 1000), unix_ms % 1000)
}

/// C `ctime()` text without the newline, e.g. `Mon Nov 23 07:12:11 2026`.
pub fn ctime(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let (y, mo, d, h, mi, s, days) = civil(unix);
    format!("{} {} {d:2} {h:02}:{mi:02}:{s:02} {y}", DAYS[(days % 7) as usize], MONTHS[(mo - 1) as usize])
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_dates() {
        // From the fixtures: timestart 1795417936 is dated 2026-11-23 07:12:16.
        assert_eq!(super::datetime(1_795_417_936), "2026-11-23 07:12:16");
        assert_eq!(super::ctime(1_795_417_931), "Mon Nov 23 07:12:11 2026");
        assert_eq!(super::datetime_ms(1_795_417_936_007), "2026-11-23 07:12:16.007");
        assert_eq!(super::datetime(0), "1970-01-01 00:00:00");
    }
}
