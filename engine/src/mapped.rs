//! Weights mapped from the artifact's files instead of copied into the heap.
//!
//! tract's NNEF loader reads every `.dat` tensor file into a heap buffer. For the packed GGUF
//! blocks (the bulk of a model: u8 tensors the block ops read as bytes) this loader, placed
//! before tract's own, maps the file and hands tract a tensor whose storage is the mapping
//! ([`MappedBytes`], a tract `TensorStorage`): no copy at load, the pages shared with the page
//! cache (the hash check at load has just read them), reclaimable under memory pressure rather
//! than anonymous memory. The block ops read the mapping directly ([`mapped_bytes`]); anything
//! else in tract that asks for the tensor's plain bytes gets a copy made once
//! ([`MappedBytes::copies`] counts them; the load test asserts there are none).
//!
//! The file format is tract's own (NNEF's 128-byte tensor header, then the data), so an
//! artifact written before this loader existed maps the same way. Other tensors (f32 norms,
//! anything smaller than [`MIN_MAPPED`]) go through tract's reader unchanged.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tract_core::internal::*;
use tract_core::ops::konst::Const;
use tract_core::tract_data::prelude::{PlainStorage, TensorStorage};
use tract_nnef::internal::{
    Identifier, ModelBuilder, Nnef, Registry, ResolvedInvocation, Resource, ResourceLoader, Value,
};

/// NNEF's tensor file header.
const HEADER: usize = 128;

/// Tensors smaller than this are read as tract reads them (norm weights and the like).
pub const MIN_MAPPED: usize = 64 * 1024;

/// A tensor's bytes in a mapped file.
pub struct MappedBytes {
    map: Arc<memmap2::Mmap>,
    offset: usize,
    len: usize,
    /// The heap copy, made only if something asks for plain storage.
    copy: OnceLock<PlainStorage>,
    copies: AtomicUsize,
}

impl MappedBytes {
    /// `len` bytes of `map` from `offset`, no heap copy yet.
    fn new(map: Arc<memmap2::Mmap>, offset: usize, len: usize) -> MappedBytes {
        MappedBytes {
            map,
            offset,
            len,
            copy: OnceLock::new(),
            copies: AtomicUsize::new(0),
        }
    }

    /// The bytes, straight from the mapping.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.offset..self.offset + self.len]
    }

    /// How many times a heap copy was asked for (0 or 1: it is kept).
    pub fn copies(&self) -> usize {
        self.copies.load(Ordering::Relaxed)
    }
}

impl PartialEq for MappedBytes {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for MappedBytes {}

impl fmt::Debug for MappedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MappedBytes({} bytes at {})", self.len, self.offset)
    }
}

impl fmt::Display for MappedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl TensorStorage for MappedBytes {
    fn byte_len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn deep_clone(&self) -> Box<dyn TensorStorage> {
        // the mapping is read-only: a clone shares it
        Box::new(MappedBytes::new(self.map.clone(), self.offset, self.len))
    }

    fn as_plain_ram(&self) -> Option<&PlainStorage> {
        self.copy.get()
    }

    fn as_plain_ram_mut(&mut self) -> Option<&mut PlainStorage> {
        None
    }

    fn into_plain_ram(self: Box<Self>) -> Option<PlainStorage> {
        self.materialize_plain_ram().ok()?;
        self.copy.into_inner()
    }

    fn dyn_hash(&self, state: &mut dyn std::hash::Hasher) {
        state.write_usize(self.len);
        state.write(&self.bytes()[..self.len.min(256)]);
    }

    fn exotic_fact(&self, _shape: &[usize]) -> TractResult<Option<Box<dyn ExoticFact>>> {
        Ok(Some(Box::new(MappedFact { bytes: self.len })))
    }

    fn materialize_plain_ram(&self) -> TractResult<&PlainStorage> {
        if let Some(copy) = self.copy.get() {
            return Ok(copy);
        }
        self.copies.fetch_add(1, Ordering::Relaxed);
        let blob = Blob::from_bytes(self.bytes())?;
        Ok(self.copy.get_or_init(|| PlainStorage::from(blob)))
    }
}

/// The fact of a mapped constant. tract copies a constant whose storage is not its own plain
/// bytes into the heap unless the constant carries such a fact ("exotic", as its block-quant
/// weights are); the block ops take it as they take plain u8 weights.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct MappedFact {
    bytes: usize,
}

impl ExoticFact for MappedFact {
    fn buffer_sizes(&self) -> TVec<TDim> {
        tvec!(self.bytes.to_dim())
    }
}

/// NNEF's `variable`, ahead of tract's in the `fieldllm` extension: a mapped tensor becomes a
/// constant with a [`MappedFact`] (tract's own `variable` would copy it into the heap); any
/// other goes to tract's.
pub fn variable(
    builder: &mut ModelBuilder<'_>,
    invocation: &ResolvedInvocation<'_>,
) -> TractResult<Value> {
    let label: String = invocation.named_arg_as(builder, "label")?;
    let tensors = &builder.proto_model.tensors;
    let tensor = tensors
        .get(&Identifier(label.clone()))
        .or_else(|| tensors.get(&Identifier(label.trim_start_matches('/').to_owned())));
    match tensor.filter(|t| t.storage_as::<MappedBytes>().is_some()) {
        Some(t) => {
            let t = t.clone();
            let shape: TVec<usize> = invocation.named_arg_as(builder, "shape")?;
            ensure!(
                t.shape() == &*shape,
                "tensor {label}: its file says {:?}, the graph {shape:?}",
                t.shape()
            );
            let fact = MappedFact { bytes: t.len() };
            builder.wire(Const::new_with_exotic_fact(t, Box::new(fact))?, &[])
        }
        None => tract_nnef::ops::nnef::deser::variable(builder, invocation),
    }
}

/// Registers [`variable`] in `reg` with the declaration of NNEF's own.
pub fn register_variable(reg: &mut Registry) {
    let decl = tract_nnef::framework::stdlib()
        .into_iter()
        .find(|f| f.decl.id.0 == "variable")
        .expect("NNEF's standard library declares variable")
        .decl;
    reg.register_primitive("variable", &decl.parameters, &decl.results, variable);
}

/// The bytes of a u8 tensor, from its mapping when it has one, else from its plain storage.
pub fn mapped_bytes(t: &Tensor) -> TractResult<&[u8]> {
    match t.storage_as::<MappedBytes>() {
        Some(m) => Ok(m.bytes()),
        None => {
            ensure!(t.datum_type() == u8::datum_type(), "weights must be u8");
            Ok(t.as_plain_ram_storage()
                .context("weights are not in memory")?
                .as_bytes())
        }
    }
}

/// Where a model's constants live ([`crate::Model::weight_storage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightStorage {
    /// Bytes of tensors mapped from the artifact's files.
    pub mapped_bytes: u64,
    /// Bytes of tensors in the heap (tract's own reading, or a model built at load).
    pub heap_bytes: u64,
    /// Mapped tensors something copied to the heap after all.
    pub copied: usize,
}

impl WeightStorage {
    /// The constants of `model`.
    pub fn of(model: &TypedModel) -> WeightStorage {
        let mut w = WeightStorage::default();
        for node in model.nodes() {
            if let Some(k) = node.op_as::<tract_core::ops::konst::Const>() {
                w.add(k.val());
            }
        }
        w
    }

    /// Counts one constant.
    pub fn add(&mut self, t: &Tensor) {
        match t.storage_as::<MappedBytes>() {
            Some(m) => {
                self.mapped_bytes += m.len as u64;
                self.copied += usize::from(m.copies() > 0);
            }
            None => {
                self.heap_bytes += (t.len() * t.datum_type().size_of()) as u64;
            }
        }
    }
}

/// The resource loader that maps large u8 `.dat` files of the model directory `dir`.
#[derive(Debug, Clone)]
pub struct MapLoader {
    dir: PathBuf,
}

impl MapLoader {
    /// For the NNEF directory `dir` (the paths tract hands the loader are relative to it).
    pub fn new(dir: &Path) -> MapLoader {
        MapLoader { dir: dir.into() }
    }
}

/// The shape of a tensor file's header when it is a u8 tensor worth mapping.
fn mappable(header: &[u8; HEADER], file_len: u64) -> Option<Vec<usize>> {
    let u32_at =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let u16_at = |i: usize| u16::from_le_bytes([header[i], header[i + 1]]);
    let (magic, data, rank) = (&header[..2], u32_at(4) as usize, u32_at(8) as usize);
    let (bits, item_type, vendor) = (u32_at(44), u16_at(48), u16_at(50));
    if magic != [0x4e, 0xef] || rank == 0 || rank > 8 {
        return None;
    }
    // unsigned (1) or quantized unsigned (2) 8-bit values: tract's u8
    if vendor != 0 || !(item_type == 1 || item_type == 2) || bits != 8 {
        return None;
    }
    let shape: Vec<usize> = (0..rank).map(|i| u32_at(12 + 4 * i) as usize).collect();
    let len = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    (len == data && data >= MIN_MAPPED && file_len == (HEADER + data) as u64).then_some(shape)
}

#[allow(unsafe_code)] // one call: mapping the file (memmap2 cannot make that safe)
impl ResourceLoader for MapLoader {
    fn name(&self) -> StaticName {
        "fieldllm MapLoader".into()
    }

    fn try_load(
        &self,
        path: &Path,
        reader: &mut dyn Read,
        _framework: &Nnef,
    ) -> TractResult<Option<(String, Arc<dyn Resource>)>> {
        if path.extension().is_none_or(|e| e != "dat") {
            return Ok(None);
        }
        let id = tract_nnef::resource::resource_path_to_id(path)?;
        let full = self.dir.join(path);
        let file = std::fs::File::open(&full).with_context(|| format!("{}", full.display()))?;
        let file_len = file.metadata()?.len();
        let mut header = [0u8; HEADER];
        reader
            .read_exact(&mut header)
            .with_context(|| format!("reading the header of {}", full.display()))?;
        let Some(shape) = mappable(&header, file_len) else {
            // tract's own reader, given back the header it expects
            let tensor = tract_nnef::tensors::read_tensor(header.as_slice().chain(reader))
                .with_context(|| format!("Error while reading tensor {path:?}"))?;
            return Ok(Some((id, Arc::new(tensor))));
        };
        // SAFETY: the mapping is read-only and the artifact's files are not written while a
        // model is loaded from them (the daemon deploys an artifact whole, its hashes checked
        // just before; `model import` writes a new directory). A file truncated under a
        // running model would fault on access, as llama.cpp's mapped weights do.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", full.display()))?;
        let len = file_len as usize - HEADER;
        let storage = MappedBytes::new(Arc::new(map), HEADER, len);
        let tensor = Tensor::from_storage(u8::datum_type(), &shape, storage);
        Ok(Some((id, Arc::new(tensor))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, t: &Tensor) {
        let mut f = std::fs::File::create(dir.join(name)).unwrap();
        tract_nnef::tensors::write_tensor(&mut f, t).unwrap();
    }

    fn load(dir: &Path, name: &str) -> TractResult<Tensor> {
        let mut f = std::fs::File::open(dir.join(name)).unwrap();
        let loaded = MapLoader::new(dir).try_load(Path::new(name), &mut f, &tract_nnef::nnef())?;
        let (_, resource) = loaded.expect("a .dat file is taken");
        Ok(resource.downcast_arc::<Tensor>().unwrap().as_ref().clone())
    }

    #[test]
    fn large_u8_tensors_are_mapped_and_others_read() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..3 * 8 * 4096).map(|i| (i * 7 % 251) as u8).collect();
        let big = Tensor::from_shape(&[3, 8, 4096], &bytes).unwrap();
        write(dir.path(), "big.dat", &big);
        let got = load(dir.path(), "big.dat").unwrap();
        let m = got.storage_as::<MappedBytes>().expect("mapped");
        assert_eq!(m.bytes(), &bytes[..]);
        assert_eq!(got.shape(), &[3, 8, 4096]);
        assert_eq!(mapped_bytes(&got).unwrap(), &bytes[..]);
        // what asks for plain bytes gets the same bytes, copied once
        assert_eq!(
            got.try_as_plain_ram().unwrap().as_slice::<u8>().unwrap(),
            &bytes[..]
        );
        assert_eq!(m.copies(), 1);

        let small = Tensor::from_shape(&[2, 3], &[1u8, 2, 3, 4, 5, 6]).unwrap();
        write(dir.path(), "small.dat", &small);
        let floats = Tensor::from_shape(&[20_000], &vec![0.5f32; 20_000]).unwrap();
        write(dir.path(), "floats.dat", &floats);
        for (name, want) in [("small.dat", &small), ("floats.dat", &floats)] {
            let got = load(dir.path(), name).unwrap();
            assert!(got.storage_as::<MappedBytes>().is_none(), "{name}");
            assert_eq!(&got, want, "{name}");
        }
    }

    #[test]
    fn a_truncated_tensor_file_is_an_error_not_a_short_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let big = Tensor::from_shape(&[2, 65536], &vec![9u8; 2 * 65536]).unwrap();
        write(dir.path(), "w.dat", &big);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("w.dat"))
            .unwrap();
        f.set_len(1000).unwrap();
        let e = load(dir.path(), "w.dat").unwrap_err();
        assert!(format!("{e:#}").contains("w.dat"), "{e:#}");
    }
}
