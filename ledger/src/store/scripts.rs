//! The Lua scripts, loaded once per Redis (EVALSHA, falling back to SCRIPT LOAD on NOSCRIPT), the
//! calls that run them ([`ScriptCall`]) and the parsing of their replies.

use std::sync::LazyLock;

use redis::{Cmd, FromRedisValue, RedisResult, RedisWrite, Script, ToRedisArgs};

use crate::Error;

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/common.lua"),
                include_str!(concat!("lua/", $file))
            ))
        })
    };
    (batch $file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/common.lua"),
                include_str!("lua/batch.lua"),
                include_str!(concat!("lua/", $file))
            ))
        })
    };
}

/// Checks every cap and holds the amount (lua/reserve.lua).
pub(crate) static RESERVE: LazyLock<Script> = script!("reserve.lua");
/// Replaces a hold with the actual cost, once per request id (lua/settle.lua).
pub(crate) static SETTLE: LazyLock<Script> = script!("settle.lua");
/// Several reserves of one tenant in one call, in order (lua/reserve_batch.lua).
pub(crate) static RESERVE_BATCH: LazyLock<Script> = script!(batch "reserve_batch.lua");
/// Several settles of one tenant in one call, in order (lua/settle_batch.lua).
pub(crate) static SETTLE_BATCH: LazyLock<Script> = script!(batch "settle_batch.lua");
/// Drops a hold without spend, or reverses its abandoned estimate (lua/release.lua).
pub(crate) static RELEASE: LazyLock<Script> = script!("release.lua");
/// Commits observer spend, once per event id (lua/record.lua).
pub(crate) static RECORD: LazyLock<Script> = script!("record.lua");
/// Commits expired holds as estimates (lua/reclaim.lua).
pub(crate) static RECLAIM: LazyLock<Script> = script!("reclaim.lua");
/// Commits one hold at its reserved amount as an estimate (lua/abandon.lua).
pub(crate) static ABANDON: LazyLock<Script> = script!("abandon.lua");

/// The scripts a proxied call runs (reserve, settle, their batches, release), which
/// [`super::Ledger::warm_up`] loads before the first call.
pub(crate) static CALL_PATH: [&LazyLock<Script>; 5] =
    [&RESERVE, &SETTLE, &RESERVE_BATCH, &SETTLE_BATCH, &RELEASE];

/// One script call: its keys and arguments, each written once into a flat buffer.
///
/// `redis::ScriptInvocation` keeps every key and argument in a `Vec<u8>` of its own and copies
/// them all again into the EVALSHA command on each attempt: about 30 allocations per proxied
/// call (counted with uprobes on mimalloc, docs/benchmarks.md). This writes them into two
/// buffers and the command once, and behaves the same on NOSCRIPT: load, then run again.
pub(crate) struct ScriptCall {
    script: &'static Script,
    keys: Args,
    args: Args,
}

/// Script arguments written back to back, with where each ends: what a call queues for a batch
/// ([`super::batch::Item`]) and what a [`ScriptCall`] sends, without a `String` per argument.
#[derive(Debug, Default, Clone)]
pub(crate) struct Args {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl Args {
    /// Room for `args` arguments of `bytes` bytes in all.
    pub(crate) fn with_capacity(bytes: usize, args: usize) -> Args {
        Args {
            data: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(args),
        }
    }

    /// Appends `v` as Redis writes it (an integer in decimal, a string as is).
    pub(crate) fn push<T: ToRedisArgs>(&mut self, v: T) -> &mut Args {
        v.write_redis_args(self);
        self
    }

    /// Appends `v` as its `Display` writes it (no intermediate `String`).
    pub(crate) fn push_fmt(&mut self, v: impl std::fmt::Display) -> &mut Args {
        self.write_arg_fmt(v);
        self
    }

    /// Inserts before argument `at` the count of the arguments from `at` on, in decimal: a
    /// count-first list (the audit record's) written in place, without a buffer of its own.
    pub(crate) fn insert_count(&mut self, at: usize) {
        use std::io::Write as _;
        let n = self.ends.len().saturating_sub(at);
        let start = at.checked_sub(1).map_or(0, |p| self.ends[p]);
        let mut digits = [0u8; 20];
        let len = {
            let mut w = &mut digits[..];
            // 20 digits hold any usize.
            let _ = write!(w, "{n}");
            20 - w.len()
        };
        self.data
            .splice(start..start, digits[..len].iter().copied());
        for e in &mut self.ends[at..] {
            *e += len;
        }
        self.ends.insert(at, start + len);
    }

    /// Appends every argument of `other`.
    pub(crate) fn append(&mut self, other: &Args) {
        let base = self.data.len();
        self.data.extend_from_slice(&other.data);
        self.ends.extend(other.ends.iter().map(|e| base + e));
    }

    /// How many arguments.
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    /// Argument `i` (empty past the end).
    pub(crate) fn get(&self, i: usize) -> &[u8] {
        match self.ends.get(i) {
            Some(&end) => &self.data[i.checked_sub(1).map_or(0, |p| self.ends[p])..end],
            None => &[],
        }
    }

    /// Argument `i` as text (empty past the end, or when it is not UTF-8: never for the names
    /// the ledger validated before writing them).
    pub(crate) fn str(&self, i: usize) -> &str {
        std::str::from_utf8(self.get(i)).unwrap_or("")
    }

    /// The arguments in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(a, b)| &self.data[a..b])
    }
}

impl RedisWrite for Args {
    fn write_arg(&mut self, arg: &[u8]) {
        self.data.extend_from_slice(arg);
        self.ends.push(self.data.len());
    }

    fn write_arg_fmt(&mut self, arg: impl std::fmt::Display) {
        use std::io::Write as _;
        // Writing into a Vec cannot fail.
        let _ = write!(self.data, "{arg}");
        self.ends.push(self.data.len());
    }

    fn writer_for_next_arg(&mut self) -> impl std::io::Write + '_ {
        /// Ends the argument when the writer is dropped.
        struct Next<'a>(&'a mut Args);
        impl Drop for Next<'_> {
            fn drop(&mut self) {
                self.0.ends.push(self.0.data.len());
            }
        }
        impl std::io::Write for Next<'_> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.data.extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        Next(self)
    }
}

impl ScriptCall {
    /// A call of `script` with no keys or arguments yet. The buffers start at the size of a
    /// single reserve or settle (3 keys, ~30 arguments, ~600 bytes), so those never grow.
    pub(crate) fn new(script: &'static Script) -> ScriptCall {
        ScriptCall {
            script,
            keys: Args::with_capacity(192, 4),
            args: Args::with_capacity(1024, 48),
        }
    }

    /// Adds a key (KEYS[n]).
    pub(crate) fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut ScriptCall {
        key.write_redis_args(&mut self.keys);
        self
    }

    /// Adds an argument (ARGV[n]).
    pub(crate) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut ScriptCall {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// Adds a key written by its `Display` (no intermediate `String`).
    pub(crate) fn key_fmt(&mut self, key: impl std::fmt::Display) -> &mut ScriptCall {
        self.keys.write_arg_fmt(key);
        self
    }

    /// Adds an argument written by its `Display` (no intermediate `String`).
    pub(crate) fn arg_fmt(&mut self, arg: impl std::fmt::Display) -> &mut ScriptCall {
        self.args.write_arg_fmt(arg);
        self
    }

    /// The arguments so far, to append to.
    pub(crate) fn args_mut(&mut self) -> &mut Args {
        &mut self.args
    }

    /// Adds every argument of `args`, in order.
    pub(crate) fn args(&mut self, args: &Args) -> &mut ScriptCall {
        self.args.append(args);
        self
    }

    /// The EVALSHA command.
    pub(crate) fn command(&self) -> Cmd {
        let n = self.keys.ends.len();
        let mut cmd = Cmd::with_capacity(
            3 + n + self.args.ends.len(),
            64 + self.keys.data.len() + self.args.data.len(),
        );
        cmd.arg("EVALSHA").arg(self.script.get_hash()).arg(n);
        for a in self.keys.iter().chain(self.args.iter()) {
            cmd.write_arg(a);
        }
        cmd
    }

    /// Runs the script by its hash; a Redis that does not have it (restarted, flushed, a new
    /// replica) gets it loaded and the call is made again.
    pub(crate) async fn invoke_async<T: FromRedisValue>(
        &self,
        con: &mut impl redis::aio::ConnectionLike,
    ) -> RedisResult<T> {
        let cmd = self.command();
        match cmd.query_async(con).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.script.load_async(con).await?;
                cmd.query_async(con).await
            }
            r => r,
        }
    }
}

/// A script reply: a status word and its string fields.
pub(crate) struct Reply {
    pub(crate) script: &'static str,
    pub(crate) fields: Vec<String>,
}

impl Reply {
    pub(crate) fn new(script: &'static str, fields: Vec<String>) -> Reply {
        Reply { script, fields }
    }

    /// The status word ("ALLOW", "DENY", ...).
    pub(crate) fn status(&self) -> &str {
        self.fields.first().map_or("", String::as_str)
    }

    /// Field `i` (0 = status).
    pub(crate) fn str(&self, i: usize) -> Result<&str, Error> {
        self.fields
            .get(i)
            .map(String::as_str)
            .ok_or_else(|| self.unexpected())
    }

    /// Field `i` as an integer.
    pub(crate) fn int(&self, i: usize) -> Result<i64, Error> {
        self.str(i)?.parse().map_err(|_| self.unexpected())
    }

    /// The error for a reply this version does not understand (a schema mismatch).
    pub(crate) fn unexpected(&self) -> Error {
        Error::ScriptReply {
            script: self.script,
            detail: format!("{:?}", self.fields),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A count inserted before a list counts the list and leaves every argument whole, at the
    /// start, in the middle and at the end, with one digit or more.
    #[test]
    fn counts_go_in_before_their_lists() {
        let texts = |a: &Args| {
            a.iter()
                .map(|x| String::from_utf8(x.to_vec()).unwrap())
                .collect::<Vec<_>>()
        };
        let mut a = Args::with_capacity(0, 0);
        a.push("id").push(7u64);
        a.insert_count(1);
        assert_eq!(texts(&a), ["id", "1", "7"]);
        a.insert_count(3);
        assert_eq!(texts(&a), ["id", "1", "7", "0"]);
        let mut b = Args::default();
        for i in 0..12 {
            b.push(format!("f{i}"));
        }
        b.insert_count(0);
        assert_eq!(b.len(), 13);
        assert_eq!((b.str(0), b.str(1), b.str(12)), ("12", "f0", "f11"));
        let mut c = Args::default();
        c.push("head").push("");
        c.push("k").push("");
        c.insert_count(2);
        assert_eq!(texts(&c), ["head", "", "2", "k", ""]);
    }

    /// Arguments keep their bounds through `append`; reading past the end gives nothing.
    #[test]
    fn args_keep_their_bounds() {
        let mut a = Args::default();
        a.push("id-1").push(-5i64).push("");
        let mut b = Args::with_capacity(4, 1);
        b.push(12u64).push("x");
        a.append(&b);
        assert_eq!(a.len(), 5);
        let all: Vec<&[u8]> = a.iter().collect();
        assert_eq!(all, [&b"id-1"[..], b"-5", b"", b"12", b"x"]);
        assert_eq!(
            (a.get(0), a.get(2), a.get(4), a.get(5)),
            (&b"id-1"[..], &b""[..], &b"x"[..], &b""[..])
        );
        assert_eq!((a.str(0), a.str(9)), ("id-1", ""));
        let mut call = ScriptCall::new(&SETTLE);
        call.arg("first").args(&a);
        let mut want = redis::cmd("EVALSHA");
        want.arg(SETTLE.get_hash())
            .arg(0)
            .arg("first")
            .arg("id-1")
            .arg(-5)
            .arg("")
            .arg(12)
            .arg("x");
        assert_eq!(
            call.command().get_packed_command(),
            want.get_packed_command()
        );
    }

    /// The command carries the script's hash, the key count, the keys and the arguments, each
    /// exactly as `redis::Cmd` writes it (integers, empty strings and bytes included).
    #[test]
    fn the_command_is_evalsha_with_every_key_and_argument_in_order() {
        let mut call = ScriptCall::new(&SETTLE);
        call.key("llmw:{t}:holds")
            .key(String::from("llmw:{t}:hold:r1"))
            .arg(-42i64)
            .arg(7u64)
            .arg("")
            .arg(&b"\x00bin"[..])
            .arg(vec!["a".to_owned(), "b".to_owned()]);
        let mut want = redis::cmd("EVALSHA");
        want.arg(SETTLE.get_hash())
            .arg(2)
            .arg("llmw:{t}:holds")
            .arg("llmw:{t}:hold:r1")
            .arg(-42i64)
            .arg(7u64)
            .arg("")
            .arg(&b"\x00bin"[..])
            .arg("a")
            .arg("b");
        assert_eq!(
            call.command().get_packed_command(),
            want.get_packed_command()
        );
        assert_eq!(
            ScriptCall::new(&RECLAIM).command().get_packed_command(),
            redis::cmd("EVALSHA")
                .arg(RECLAIM.get_hash())
                .arg(0)
                .get_packed_command(),
            "no keys, no arguments"
        );
    }
}
