//! The little SDP surgery third-party call control needs (RFC 3725, RFC 3264): callbus sends
//! each leg the other leg's SDP under callbus's own origin (`o=`), with the version raised on
//! every new offer, and changes media direction for hold.

/// callbus's origin towards one leg: the session id stays, the version grows with each SDP
/// sent to that leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    /// `sess-id`.
    pub session: u64,
    /// `sess-version` of the last SDP sent.
    pub version: u64,
}

impl Origin {
    /// The next version (each new offer or answer to this leg).
    pub fn bump(&mut self) -> Origin {
        self.version += 1;
        *self
    }
}

fn lines(sdp: &str) -> impl Iterator<Item = &str> {
    sdp.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).filter(|l| !l.is_empty())
}

fn join(out: Vec<String>) -> String {
    let mut s = out.join("\r\n");
    s.push_str("\r\n");
    s
}

/// `sdp` with its `o=` line made callbus's: user `callbus`, `origin`'s id and version, the
/// original network address kept.
pub fn with_origin(sdp: &str, origin: Origin) -> String {
    let out = lines(sdp)
        .map(|l| match l.strip_prefix("o=") {
            Some(rest) => {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let tail = if fields.len() >= 6 { fields[3..].join(" ") } else { "IN IP4 0.0.0.0".to_owned() };
                format!("o=callbus {} {} {tail}", origin.session, origin.version)
            }
            None => l.to_owned(),
        })
        .collect();
    join(out)
}

const DIRECTIONS: [&str; 4] = ["a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive"];

/// `sdp` with every media direction set to `direction` (`sendrecv`, `sendonly`, `recvonly`,
/// `inactive`): existing direction attributes are replaced, and one is added at session level
/// when there was none.
pub fn with_direction(sdp: &str, direction: &str) -> String {
    let wanted = format!("a={direction}");
    let mut replaced = false;
    let mut out: Vec<String> = lines(sdp)
        .map(|l| {
            if DIRECTIONS.contains(&l) {
                replaced = true;
                wanted.clone()
            } else {
                l.to_owned()
            }
        })
        .collect();
    if !replaced {
        let at = out.iter().position(|l| l.starts_with("t=")).map(|i| i + 1).unwrap_or(out.len());
        let first_media = out.iter().position(|l| l.starts_with("m=")).unwrap_or(out.len());
        out.insert(at.min(first_media), wanted);
    }
    join(out)
}

/// The media direction of `sdp` (its first direction attribute), `sendrecv` when none.
pub fn direction(sdp: &str) -> &str {
    lines(sdp).find_map(|l| DIRECTIONS.contains(&l).then(|| &l[2..])).unwrap_or("sendrecv")
}

/// A placeholder answer to `offer` that accepts every stream but sends and receives nothing:
/// the offer's streams, callbus's origin, connection `0.0.0.0`, all `inactive` (RFC 3725 §5).
pub fn black_hole_answer(offer: &str, origin: Origin) -> String {
    let held: Vec<String> = lines(&with_direction(offer, "inactive"))
        .map(|l| if l.starts_with("c=IN IP4 ") { "c=IN IP4 0.0.0.0".to_owned() } else { l.to_owned() })
        .collect();
    with_origin(&join(held), origin)
}

/// Whether `text` looks like an SDP session description at all.
pub fn looks_like_sdp(text: &str) -> bool {
    let mut l = lines(text);
    l.next().is_some_and(|first| first.starts_with("v=")) && lines(text).any(|x| x.starts_with("m="))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=uac 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 20288 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n";

    #[test]
    fn origin_is_ours_and_versions_grow() {
        let mut o = Origin { session: 7, version: 1 };
        let s = with_origin(OFFER, o.bump());
        assert!(s.contains("o=callbus 7 2 IN IP4 127.0.0.1\r\n"), "{s}");
        assert!(s.contains("m=audio 20288"));
        assert_eq!(o.version, 2);
    }

    #[test]
    fn direction_is_replaced_or_added() {
        let s = with_direction(OFFER, "inactive");
        assert_eq!(direction(&s), "inactive");
        assert!(!s.contains("sendrecv"));
        let bare = OFFER.replace("a=sendrecv\r\n", "");
        let s = with_direction(&bare, "sendonly");
        let t = s.find("t=0 0").expect("t=");
        let a = s.find("a=sendonly").expect("added");
        let m = s.find("m=audio").expect("m=");
        assert!(t < a && a < m, "{s}");
        assert_eq!(direction(&bare), "sendrecv");
    }

    #[test]
    fn black_hole_keeps_streams_and_sends_nothing() {
        let s = black_hole_answer(OFFER, Origin { session: 1, version: 1 });
        assert!(s.contains("c=IN IP4 0.0.0.0") && s.contains("a=inactive") && s.contains("m=audio 20288"));
        assert!(s.starts_with("v=0\r\no=callbus 1 1 "));
        assert!(looks_like_sdp(&s));
        assert!(!looks_like_sdp("hello"));
    }
}
