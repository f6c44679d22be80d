//! A small seeded generator (SplitMix64): identical streams on every platform, no dependencies.

/// SplitMix64 with uniform and normal draws.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose stream is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// N×D values, each column with its own mean and scale, as projector outputs have.
    pub fn matrix(&mut self, n: usize, d: usize) -> Vec<f32> {
        let shift: Vec<f64> = (0..d).map(|_| 3.0 * self.normal()).collect();
        let scale: Vec<f64> = (0..d).map(|_| 0.5 + 2.0 * self.uniform()).collect();
        let mut z = vec![0f32; n * d];
        for row in z.chunks_exact_mut(d.max(1)) {
            for (j, x) in row.iter_mut().enumerate() {
                *x = (shift[j] + scale[j] * self.normal()) as f32;
            }
        }
        z
    }

    /// A second view correlated with `za`, as two augmentations of one image would be.
    pub fn correlated(&mut self, za: &[f32], noise: f64) -> Vec<f32> {
        za.iter()
            .map(|&x| (f64::from(x) * 0.8 + noise * self.normal() + 0.1) as f32)
            .collect()
    }
}
