//! Pickle protocol-2 opcodes used by the writer (and read by the reader).

pub const PROTO: u8 = 0x80;
pub const STOP: u8 = b'.';
pub const MARK: u8 = b'(';
pub const NONE: u8 = b'N';
pub const NEWTRUE: u8 = 0x88;
pub const NEWFALSE: u8 = 0x89;
pub const BININT: u8 = b'J';
pub const BININT1: u8 = b'K';
pub const BININT2: u8 = b'M';
pub const LONG1: u8 = 0x8a;
pub const BINFLOAT: u8 = b'G';
pub const BINUNICODE: u8 = b'X';
pub const EMPTY_LIST: u8 = b']';
pub const APPENDS: u8 = b'e';
pub const EMPTY_TUPLE: u8 = b')';
pub const TUPLE: u8 = b't';
pub const TUPLE1: u8 = 0x85;
pub const TUPLE2: u8 = 0x86;
pub const TUPLE3: u8 = 0x87;
pub const EMPTY_DICT: u8 = b'}';
pub const SETITEMS: u8 = b'u';
pub const GLOBAL: u8 = b'c';
pub const REDUCE: u8 = b'R';
pub const BINPERSID: u8 = b'Q';
