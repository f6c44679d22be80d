//! Datasets: ImageFolder (`root/<class>/*.jpg|png`), IDX (MNIST, Fashion-MNIST; gzipped or not),
//! CIFAR-10's binary batches, and the built-in Fashion-MNIST sample. Images are 8-bit HWC pixels,
//! decoded once into memory — or, for an ImageFolder too large for that (ImageNet), decoded from
//! their files each time a view is made, on the data worker threads.

use crate::error::{Error, Result};
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Decoded bytes an ImageFolder may take in memory before it is read from its files instead
/// (the default of [`crate::train::run::TrainConfig::image_memory`]).
pub const DEFAULT_IMAGE_MEMORY: usize = 8 << 30;

/// One 8-bit image, height × width × channels, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Height, in pixels.
    pub h: usize,
    /// Width, in pixels.
    pub w: usize,
    /// Channels per pixel (1 for grayscale, 3 for RGB).
    pub c: usize,
    /// The pixels, `h × w × c` bytes.
    pub data: Vec<u8>,
}

/// Where a dataset's pixels are.
#[derive(Debug, Clone)]
enum Store {
    Memory(Vec<Image>),
    /// Image files with their sizes (from the headers), decoded on use to `channels`.
    Files {
        paths: Vec<PathBuf>,
        dims: Vec<(u32, u32)>,
        channels: usize,
        /// Indices of files that failed to decode when used (a gray image stood in): their
        /// headers read when the dataset was opened, their pixels did not.
        failures: Arc<Mutex<BTreeSet<usize>>>,
    },
}

/// Labelled images of one split.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Where it came from, for messages.
    pub source: String,
    store: Store,
    /// Class index of each image, in image order.
    pub labels: Vec<u32>,
    /// Class names, indexed by label.
    pub classes: Vec<String>,
    /// Files that could not be read or decoded, and were left out.
    pub skipped: usize,
}

impl Dataset {
    /// A dataset of decoded images (`labels` and `images` of equal length).
    pub fn in_memory(
        source: impl Into<String>,
        images: Vec<Image>,
        labels: Vec<u32>,
        classes: Vec<String>,
    ) -> Self {
        Self {
            source: source.into(),
            store: Store::Memory(images),
            labels,
            classes,
            skipped: 0,
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the dataset holds no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Channels of the images (all images of a dataset share it).
    pub fn channels(&self) -> usize {
        match &self.store {
            Store::Memory(images) => images.first().map_or(3, |i| i.c),
            Store::Files { channels, .. } => *channels,
        }
    }

    /// Whether images are decoded from their files on use.
    pub fn is_streamed(&self) -> bool {
        matches!(self.store, Store::Files { .. })
    }

    /// Height and width of image `i`.
    pub fn dims(&self, i: usize) -> (usize, usize) {
        match &self.store {
            Store::Memory(images) => (images[i].h, images[i].w),
            Store::Files { dims, .. } => (dims[i].0 as usize, dims[i].1 as usize),
        }
    }

    /// Image `i`. A streamed file that does not decode (its header read when the dataset was
    /// opened, but its pixels are corrupt, or it changed on disk since) gives a mid-gray image of
    /// its recorded size, is counted in [`Dataset::decode_failures`], and the first one is
    /// logged (`log::warn!`); training goes on. (Held in memory, such a file is skipped when the
    /// dataset is opened instead.)
    pub fn image(&self, i: usize) -> Cow<'_, Image> {
        match &self.store {
            Store::Memory(images) => Cow::Borrowed(&images[i]),
            Store::Files {
                paths,
                dims,
                channels,
                failures,
            } => match decode(&paths[i]) {
                Ok(img) => Cow::Owned(to_channels(img, *channels)),
                Err(e) => {
                    let mut f = failures.lock().unwrap_or_else(|p| p.into_inner());
                    if f.is_empty() {
                        log::warn!(
                            "{} could not be decoded ({e}); a gray image stands in (further \
                             failures are counted, not logged)",
                            paths[i].display()
                        );
                    }
                    f.insert(i);
                    drop(f);
                    let (h, w) = (dims[i].0 as usize, dims[i].1 as usize);
                    Cow::Owned(Image {
                        h,
                        w,
                        c: *channels,
                        data: vec![128; h * w * channels],
                    })
                }
            },
        }
    }

    /// Distinct files of this dataset that failed to decode when used (0 for datasets held in
    /// memory).
    pub fn decode_failures(&self) -> usize {
        match &self.store {
            Store::Memory(_) => 0,
            Store::Files { failures, .. } => {
                failures.lock().unwrap_or_else(|p| p.into_inner()).len()
            }
        }
    }

    /// The images at `idx`, in that order, as a new dataset (only they are copied; its failure
    /// count starts at zero).
    pub fn selected(&self, idx: &[usize]) -> Dataset {
        let store = match &self.store {
            Store::Memory(images) => {
                Store::Memory(idx.iter().map(|&i| images[i].clone()).collect())
            }
            Store::Files {
                paths,
                dims,
                channels,
                ..
            } => Store::Files {
                paths: idx.iter().map(|&i| paths[i].clone()).collect(),
                dims: idx.iter().map(|&i| dims[i]).collect(),
                channels: *channels,
                failures: Arc::default(),
            },
        };
        Dataset {
            source: self.source.clone(),
            store,
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            classes: self.classes.clone(),
            skipped: self.skipped,
        }
    }

    /// At most `n` images (all when `n` is 0), every k-th so classes stay balanced, as a new
    /// dataset (only they are copied).
    pub fn subsampled(&self, n: usize) -> Dataset {
        let n = if n == 0 {
            self.len()
        } else {
            n.min(self.len())
        };
        let keep: Vec<usize> = (0..n).map(|i| i * self.len() / n.max(1)).collect();
        self.selected(&keep)
    }

    /// Per-channel mean and standard deviation of the pixels in [0, 1], over at most 2,000 images
    /// spread across the set (deterministic; streamed images are decoded 64 at a time).
    pub fn pixel_stats(&self) -> (Vec<f32>, Vec<f32>) {
        let c = self.channels();
        let step = self.len().div_ceil(2000).max(1);
        let mut s = vec![0f64; c];
        let mut q = vec![0f64; c];
        let mut count = 0f64;
        let picked: Vec<usize> = (0..self.len()).step_by(step).collect();
        // Decoding (for streamed datasets) in parallel, a chunk at a time; the sums stay in
        // index order.
        for chunk in picked.chunks(64) {
            let images: Vec<Cow<'_, Image>> = chunk.par_iter().map(|&i| self.image(i)).collect();
            for img in &images {
                for px in img.data.chunks_exact(img.c) {
                    for ch in 0..c {
                        let v = f64::from(px[ch]) / 255.0;
                        s[ch] += v;
                        q[ch] += v * v;
                    }
                }
                count += (img.h * img.w) as f64;
            }
        }
        let mean: Vec<f64> = s.iter().map(|v| v / count.max(1.0)).collect();
        let std = q
            .iter()
            .zip(&mean)
            .map(|(v, m)| ((v / count.max(1.0) - m * m).max(0.0)).sqrt().max(1e-3) as f32)
            .collect();
        (mean.iter().map(|&m| m as f32).collect(), std)
    }

    /// Keeps at most `n` images, taking every k-th so classes stay balanced.
    pub fn subsample(self, n: usize) -> Self {
        if n >= self.len() || n == 0 {
            return self;
        }
        let keep: Vec<usize> = (0..n).map(|i| i * self.len() / n).collect();
        self.selected(&keep)
    }
}

/// A train and a test split.
#[derive(Debug, Clone)]
pub struct Splits {
    /// Images to train on.
    pub train: Dataset,
    /// Held-out images for evaluation.
    pub test: Dataset,
}

const BUILTIN: [&[u8]; 4] = [
    include_bytes!("../../data/fashion-mnist-sample/train-images-idx3-ubyte.gz"),
    include_bytes!("../../data/fashion-mnist-sample/train-labels-idx1-ubyte.gz"),
    include_bytes!("../../data/fashion-mnist-sample/t10k-images-idx3-ubyte.gz"),
    include_bytes!("../../data/fashion-mnist-sample/t10k-labels-idx1-ubyte.gz"),
];

const FASHION_CLASSES: [&str; 10] = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot",
];

/// Where the full Fashion-MNIST lands with Debian's `dataset-fashion-mnist`.
pub const SYSTEM_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// The layouts a dataset folder may have, for messages about one that has none of them.
pub const LAYOUTS: &str = "accepted layouts: DIR/train/<class>/<images> with DIR/test/ or \
    DIR/val/ beside it; DIR/<class>/<images> (every 10th image held out for testing); IDX files \
    (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz] and the t10k pair); CIFAR-10 \
    binary batches (data_batch_1.bin ... and test_batch.bin); images are .jpg, .jpeg or .png";

/// Whether `spec` names a built-in dataset (`builtin`, `fashion-mnist`) rather than a folder.
pub fn is_builtin_name(spec: &Path) -> bool {
    spec == Path::new("builtin") || spec == Path::new("fashion-mnist")
}

/// Opens a dataset by name or path:
/// * `builtin` — the Fashion-MNIST sample compiled into the binary (10,000 train, 2,000 test);
/// * `fashion-mnist` — the full set from [`SYSTEM_FASHION_MNIST`];
/// * a folder with `*-images-idx3-ubyte[.gz]` files — IDX;
/// * a folder with `data_batch_*.bin` — CIFAR-10 binary;
/// * a folder with `train/` and `test/` (or `val/`) of class folders, or of class folders
///   directly (then every 10th image is held out as the test split) — ImageFolder, held in
///   memory when its decoded images fit in `image_memory` bytes ([`DEFAULT_IMAGE_MEMORY`] is a
///   good default) and in the memory the machine has free, else decoded from its files as views
///   are made. Only regular files are read (pipes, sockets and devices are skipped and
///   counted), hidden files and folders are ignored, and names need not be UTF-8.
pub fn open(spec: impl AsRef<Path>, image_memory: usize) -> Result<Splits> {
    open_with(spec, image_memory, 0)
}

/// [`open`], keeping at most `max_train` training images (0: all), every k-th so classes stay
/// balanced; an image folder reads and decodes only those.
pub fn open_with(spec: impl AsRef<Path>, image_memory: usize, max_train: usize) -> Result<Splits> {
    let spec = spec.as_ref();
    let mut s = match spec.to_str() {
        Some("builtin") => {
            let train = idx_from_bytes("builtin", BUILTIN[0], BUILTIN[1])?;
            let test = idx_from_bytes("builtin", BUILTIN[2], BUILTIN[3])?;
            Splits {
                train: named(train),
                test: named(test),
            }
        }
        Some("fashion-mnist") => {
            let dir = Path::new(SYSTEM_FASHION_MNIST);
            if !dir.is_dir() {
                return Err(Error::dataset(
                    dir,
                    "not installed (apt-get install dataset-fashion-mnist), or use --data builtin",
                ));
            }
            open_idx_dir(dir)?
        }
        _ => {
            let dir = spec;
            if !dir.exists() {
                return Err(Error::dataset(dir, "no such file or folder"));
            }
            if !dir.is_dir() {
                return Err(Error::dataset(dir, "not a folder"));
            }
            if find_idx(dir, "train").is_some() {
                open_idx_dir(dir)?
            } else if dir.join("data_batch_1.bin").is_file() {
                Splits {
                    train: cifar_bin(dir, true)?,
                    test: cifar_bin(dir, false)?,
                }
            } else {
                let budget = crate::io::available_memory()
                    .map_or(image_memory, |free| image_memory.min(free as usize));
                image_folder_splits(dir, budget, max_train)?
            }
        }
    };
    if max_train > 0 {
        s.train = s.train.subsample(max_train);
    }
    Ok(s)
}

fn named(mut d: Dataset) -> Dataset {
    if d.classes.len() <= 10 {
        d.classes = FASHION_CLASSES.iter().map(|s| s.to_string()).collect();
    }
    d
}

fn find_idx(dir: &Path, split: &str) -> Option<(PathBuf, PathBuf)> {
    for s in [split, if split == "train" { "train" } else { "t10k" }] {
        for ext in [".gz", ""] {
            let i = dir.join(format!("{s}-images-idx3-ubyte{ext}"));
            let l = dir.join(format!("{s}-labels-idx1-ubyte{ext}"));
            if i.is_file() && l.is_file() {
                return Some((i, l));
            }
        }
    }
    None
}

fn open_idx_dir(dir: &Path) -> Result<Splits> {
    let (ti, tl) = find_idx(dir, "train")
        .ok_or_else(|| Error::dataset(dir, "no train-images-idx3-ubyte[.gz]"))?;
    let (vi, vl) = find_idx(dir, "t10k")
        .ok_or_else(|| Error::dataset(dir, "no t10k-images-idx3-ubyte[.gz]"))?;
    let read = |p: &Path| std::fs::read(p).map_err(|e| Error::io(p, e));
    let name = |p: &Path| p.display().to_string();
    let source = dir.display().to_string();
    let train = idx_files(&source, [&name(&ti), &name(&tl)], &read(&ti)?, &read(&tl)?)?;
    let test = idx_files(&source, [&name(&vi), &name(&vl)], &read(&vi)?, &read(&vl)?)?;
    Ok(Splits {
        train: named(train),
        test: named(test),
    })
}

fn gunzip_if_needed(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        // Every member, as zcat reads them: a file may be several gzip streams end to end.
        flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut out)?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

/// Parses an IDX header: (dimensions, payload). Only unsigned-byte data (type 0x08).
fn idx_parse<'a>(src: &str, b: &'a [u8]) -> Result<(Vec<usize>, &'a [u8])> {
    let bad = |r: &str| Error::dataset(src, format!("not an IDX file: {r}"));
    if b.len() < 4 || b[0] != 0 || b[1] != 0 {
        return Err(bad("bad magic number"));
    }
    if b[2] != 0x08 {
        return Err(bad("only unsigned-byte IDX data is supported"));
    }
    let nd = b[3] as usize;
    let head = 4 + 4 * nd;
    if b.len() < head {
        return Err(bad("truncated header"));
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| {
            u32::from_be_bytes([b[4 + 4 * i], b[5 + 4 * i], b[6 + 4 * i], b[7 + 4 * i]]) as usize
        })
        .collect();
    let need = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("sizes overflow"))?;
    if b.len() - head < need {
        return Err(bad(&format!(
            "truncated data: {} bytes for {dims:?}",
            b.len() - head
        )));
    }
    Ok((dims, &b[head..head + need]))
}

/// IDX images (N×H×W) and labels (N) from file contents, gzipped or not.
pub fn idx_from_bytes(src: &str, images: &[u8], labels: &[u8]) -> Result<Dataset> {
    idx_files(src, [src, src], images, labels)
}

/// [`idx_from_bytes`] with the images' and labels' file names for messages.
fn idx_files(
    src: &str,
    [inames, lnames]: [&str; 2],
    images: &[u8],
    labels: &[u8],
) -> Result<Dataset> {
    let images = gunzip_if_needed(images)
        .map_err(|e| Error::dataset(inames, format!("cannot gunzip images: {e}")))?;
    let labels = gunzip_if_needed(labels)
        .map_err(|e| Error::dataset(lnames, format!("cannot gunzip labels: {e}")))?;
    let (idims, ipx) = idx_parse(inames, &images)?;
    let (ldims, lb) = idx_parse(lnames, &labels)?;
    if idims.len() != 3 || ldims.len() != 1 || idims[0] != ldims[0] {
        return Err(Error::dataset(
            src,
            format!("IDX shapes do not match: images {idims:?}, labels {ldims:?}"),
        ));
    }
    if idims[0] == 0 {
        return Err(Error::dataset(src, "the IDX files hold no images"));
    }
    let (n, h, w) = (idims[0], idims[1], idims[2]);
    check_side(w as u32, h as u32)
        .map_err(|e| Error::dataset(src, format!("IDX images of {h}×{w}: {e}")))?;
    let images = (0..n)
        .map(|i| Image {
            h,
            w,
            c: 1,
            data: ipx[i * h * w..(i + 1) * h * w].to_vec(),
        })
        .collect();
    let labels: Vec<u32> = lb.iter().map(|&l| u32::from(l)).collect();
    let classes = (0..=labels.iter().copied().max().unwrap_or(0))
        .map(|c| c.to_string())
        .collect();
    Ok(Dataset::in_memory(src.to_string(), images, labels, classes))
}

/// CIFAR-10 binary batches: `data_batch_{1..5}.bin` (train) or `test_batch.bin`.
pub fn cifar_bin(dir: &Path, train: bool) -> Result<Dataset> {
    let files: Vec<PathBuf> = if train {
        (1..=5)
            .map(|i| dir.join(format!("data_batch_{i}.bin")))
            .filter(|p| p.is_file())
            .collect()
    } else {
        vec![dir.join("test_batch.bin")]
    };
    const REC: usize = 1 + 3072;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for f in &files {
        let b = std::fs::read(f).map_err(|e| Error::io(f, e))?;
        if b.is_empty() || b.len() % REC != 0 {
            return Err(Error::dataset(
                f,
                format!(
                    "{} bytes is not a whole number of 3,073-byte records",
                    b.len()
                ),
            ));
        }
        for r in b.chunks_exact(REC) {
            if r[0] > 9 {
                return Err(Error::dataset(f, format!("label {} out of range", r[0])));
            }
            labels.push(u32::from(r[0]));
            // Stored channel-planar (1024 R, 1024 G, 1024 B); images here are HWC.
            let mut data = vec![0u8; 3072];
            for p in 0..1024 {
                for ch in 0..3 {
                    data[p * 3 + ch] = r[1 + ch * 1024 + p];
                }
            }
            images.push(Image {
                h: 32,
                w: 32,
                c: 3,
                data,
            });
        }
    }
    if images.is_empty() {
        return Err(Error::dataset(dir, "no CIFAR-10 batches found"));
    }
    let classes = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Ok(Dataset::in_memory(
        dir.display().to_string(),
        images,
        labels,
        classes,
    ))
}

fn image_folder_splits(dir: &Path, budget: usize, max_train: usize) -> Result<Splits> {
    let test_dir = ["test", "val"]
        .iter()
        .map(|s| dir.join(s))
        .find(|p| p.is_dir());
    if dir.join("train").is_dir() {
        let Some(t) = test_dir else {
            return Err(Error::dataset(
                dir,
                format!("has train/ but no test/ or val/ beside it; {LAYOUTS}"),
            ));
        };
        // Labels and channels are the training split's: the test split is read against them,
        // not numbered and converted on its own.
        let root = dir.join("train");
        let listed = list_class_files(&root, None)?;
        let train = load_files(&root, subsampled(listed, max_train), budget, None)?;
        let root = t;
        let listed = list_class_files(&root, Some(&train.classes))?;
        let test = load_files(&root, listed, budget, Some(&train))?;
        return Ok(Splits { train, test });
    }
    // One folder of classes: every 10th file is held out as the test split, chosen from the
    // file list, so neither split is a copy of the other.
    let listed = list_class_files(dir, None)?;
    let n = listed.files.len();
    if n < 10 {
        return Err(Error::dataset(
            dir,
            format!(
                "{n} image file(s) is too few to hold out every 10th as a test split (10 or more \
                 are needed, or give train/ and test/ folders)"
            ),
        ));
    }
    let (mut train_files, mut test_files) = (Vec::new(), Vec::new());
    for (i, f) in listed.files.into_iter().enumerate() {
        if i % 10 == 9 {
            test_files.push(f);
        } else {
            train_files.push(f);
        }
    }
    let part = |files| Listed {
        classes: listed.classes.clone(),
        files,
        irregular: listed.irregular,
    };
    let train = load_files(dir, subsampled(part(train_files), max_train), budget, None)?;
    let test = load_files(dir, part(test_files), budget, Some(&train))?;
    Ok(Splits { train, test })
}

/// `root/<class>/<image>` with JPEG or PNG files; classes in sorted order. Files that cannot be
/// read or decoded are skipped and counted. The dataset is RGB when any readable file is colour
/// (gray images are converted), gray when all are. When the decoded images would take more than
/// `budget` bytes (estimated from the file headers), they are decoded from their files on use
/// instead of once up front.
pub fn image_folder(root: &Path, budget: usize) -> Result<Dataset> {
    let listed = list_class_files(root, None)?;
    load_files(root, listed, budget, None)
}

/// The image files of a class-folder tree, each with its label.
struct Listed {
    classes: Vec<String>,
    files: Vec<(PathBuf, u32)>,
    /// Entries with an image's name that are not regular files (pipes, sockets, devices).
    irregular: usize,
}

/// At most `n` of the files (all when `n` is 0), every k-th so classes stay balanced.
fn subsampled(mut l: Listed, n: usize) -> Listed {
    let len = l.files.len();
    if n > 0 && n < len {
        let keep: Vec<usize> = (0..n).map(|i| i * len / n).collect();
        l.files = keep.iter().map(|&i| l.files[i].clone()).collect();
    }
    l
}

fn hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// Lists `root`'s class folders (hidden ones ignored; names kept as the OS gives them, shown
/// lossily) and their image files. Against `like` (a test split read against its training
/// split's classes) a class folder `like` lacks is an error, and labels are `like`'s.
fn list_class_files(root: &Path, like: Option<&[String]>) -> Result<Listed> {
    let rd = std::fs::read_dir(root).map_err(|e| Error::io(root, e))?;
    let mut found: Vec<std::ffi::OsString> = rd
        .filter_map(|e| e.ok())
        .filter(|e| !hidden(&e.file_name()) && e.path().is_dir())
        .map(|e| e.file_name())
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(Error::dataset(
            root,
            format!("no class folders (expected <class>/<image files> inside); {LAYOUTS}"),
        ));
    }
    let shown = |c: &std::ffi::OsStr| c.to_string_lossy().into_owned();
    let classes: Vec<String> = match like {
        Some(l) => {
            if let Some(c) = found.iter().find(|c| !l.contains(&shown(c))) {
                return Err(Error::dataset(
                    root,
                    format!(
                        "class folder `{}` is not among the training split's classes",
                        shown(c)
                    ),
                ));
            }
            l.to_vec()
        }
        None => found.iter().map(|c| shown(c)).collect(),
    };
    let mut files: Vec<(PathBuf, u32)> = Vec::new();
    let mut irregular = 0;
    for c in &found {
        let ci = classes.iter().position(|k| *k == shown(c)).unwrap_or(0);
        let dir = root.join(c);
        let mut fs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok())
            .filter(|e| !hidden(&e.file_name()))
            .map(|e| e.path())
            .filter(|p| {
                p.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                    matches!(x.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png")
                })
            })
            .collect();
        // Opening a pipe would wait for a writer forever: only regular files (symbolic links
        // followed) are read.
        let before = fs.len();
        fs.retain(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()));
        irregular += before - fs.len();
        fs.sort();
        files.extend(fs.into_iter().map(|p| (p, ci as u32)));
    }
    if irregular > 0 {
        log::warn!(
            "{irregular} entries in {} named like images are not regular files (pipes, sockets, \
             devices or broken links) and were skipped",
            root.display()
        );
    }
    if files.is_empty() {
        return Err(Error::dataset(
            root,
            format!("no .jpg, .jpeg or .png files in the class folders; {LAYOUTS}"),
        ));
    }
    Ok(Listed {
        classes,
        files,
        irregular,
    })
}

/// Reads the listed files as a dataset, against `like`'s channel count when given.
fn load_files(
    root: &Path,
    listed: Listed,
    budget: usize,
    like: Option<&Dataset>,
) -> Result<Dataset> {
    let Listed {
        classes,
        files,
        irregular,
    } = listed;
    // Headers first: sizes and channels, without decoding.
    let headers: Vec<Option<(u32, u32, usize)>> =
        files.par_iter().map(|(p, _)| header(p).ok()).collect();
    let channels = like.map(Dataset::channels).unwrap_or_else(|| {
        if headers.iter().flatten().any(|h| h.2 == 3) || headers.iter().flatten().next().is_none() {
            3
        } else {
            1
        }
    });
    let bytes: usize = headers
        .iter()
        .flatten()
        .map(|&(h, w, _)| h as usize * w as usize * channels)
        .sum();
    if bytes > budget {
        let mut paths = Vec::new();
        let mut dims = Vec::new();
        let mut labels = Vec::new();
        let mut skipped = irregular;
        for (hd, (path, label)) in headers.into_iter().zip(&files) {
            match hd {
                Some((h, w, _)) => {
                    paths.push(path.clone());
                    dims.push((h, w));
                    labels.push(*label);
                }
                None => skipped += 1,
            }
        }
        if skipped > 0 {
            log::warn!(
                "{skipped} of {} files in {} have unreadable headers and were skipped",
                files.len(),
                root.display()
            );
        }
        if paths.is_empty() {
            return Err(Error::dataset(
                root,
                format!("none of the {} image files could be read", files.len()),
            ));
        }
        log::info!(
            "{}: {} images would take {:.1} GiB decoded; decoding them from disk as views are made",
            root.display(),
            paths.len(),
            bytes as f64 / (1u64 << 30) as f64
        );
        return Ok(Dataset {
            source: root.display().to_string(),
            store: Store::Files {
                paths,
                dims,
                channels,
                failures: Arc::default(),
            },
            labels,
            classes,
            skipped,
        });
    }
    let decoded: Vec<Option<Image>> = files.par_iter().map(|(p, _)| decode(p).ok()).collect();
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let mut skipped = irregular;
    for (img, (path, label)) in decoded.into_iter().zip(&files) {
        match img {
            Some(i) => {
                images.push(to_channels(i, channels));
                labels.push(*label);
            }
            None => {
                skipped += 1;
                if skipped <= 5 {
                    log::warn!("skipping unreadable image {}", path.display());
                }
            }
        }
    }
    if skipped > 0 {
        log::warn!(
            "{skipped} of {} images in {} could not be read and were skipped",
            files.len(),
            root.display()
        );
    }
    if images.is_empty() {
        return Err(Error::dataset(
            root,
            format!("none of the {} image files could be decoded", files.len()),
        ));
    }
    Ok(Dataset {
        source: root.display().to_string(),
        store: Store::Memory(images),
        labels,
        classes,
        skipped,
    })
}

/// Images larger than this on a side are refused before anything is allocated for them: a few
/// bytes of header can claim gigapixels.
const MAX_SIDE: u32 = 16384;

fn limits() -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(MAX_SIDE);
    l.max_image_height = Some(MAX_SIDE);
    l
}

fn check_side(w: u32, h: u32) -> std::result::Result<(), String> {
    if w == 0 || h == 0 {
        return Err("empty image".into());
    }
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(format!(
            "{w}×{h} pixels exceeds the {MAX_SIDE}-pixel limit per side"
        ));
    }
    Ok(())
}

/// Height, width and channels (1 or 3, as [`decode`] gives them) from a file's header.
fn header(path: &Path) -> std::result::Result<(u32, u32, usize), String> {
    use image::ImageDecoder;
    // Headers sit at the start: try the first 64 KiB (a JPEG decoder would otherwise read the
    // whole file), then the whole file.
    let mut prefix = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 << 10).read_to_end(&mut prefix))
        .map_err(|e| e.to_string())?;
    let parse = |bytes: &[u8]| -> std::result::Result<(u32, u32, usize), String> {
        let dec = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| e.to_string())?
            .into_decoder()
            .map_err(|e| e.to_string())?;
        let (w, h) = dec.dimensions();
        let c = if dec.color_type().channel_count() <= 2 {
            1
        } else {
            3
        };
        Ok((h, w, c))
    };
    let (h, w, c) = match parse(&prefix) {
        Ok(v) => v,
        Err(_) => parse(&std::fs::read(path).map_err(|e| e.to_string())?)?,
    };
    check_side(w, h)?;
    Ok((h, w, c))
}

fn decode(path: &Path) -> std::result::Result<Image, String> {
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    reader.limits(limits());
    let img = reader.decode().map_err(|e| e.to_string())?;
    check_side(img.width(), img.height())?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok(match img.color().channel_count() {
        1 | 2 => Image {
            h,
            w,
            c: 1,
            data: img.into_luma8().into_raw(),
        },
        _ => Image {
            h,
            w,
            c: 3,
            data: img.into_rgb8().into_raw(),
        },
    })
}

fn to_channels(img: Image, c: usize) -> Image {
    if img.c == c {
        return img;
    }
    let data = if c == 1 {
        img.data
            .chunks_exact(3)
            .map(|p| {
                (0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]))
                    .round() as u8
            })
            .collect()
    } else {
        img.data.iter().flat_map(|&v| [v, v, v]).collect()
    };
    Image { c, data, ..img }
}
