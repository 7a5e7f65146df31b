//! How many pixels may be held at full resolution at once, across all requests.
//!
//! An image takes about 13 bytes a pixel while it is judged (decoded image, full-size
//! map, region labels), and admission alone bounds requests, not their size: 64 queued
//! 40-megapixel uploads would need some 33 GB. Each request holds its image's share of
//! this budget from before decoding until its answer is built, so memory stays near
//! budget × 13 bytes whatever arrives; small images never wait on each other.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Pixels are counted in units of this many, so a semaphore's permit count suffices.
const UNIT: u64 = 1024;

#[derive(Debug, Clone)]
pub struct PixelBudget {
    units: Arc<Semaphore>,
    total: u32,
}

impl PixelBudget {
    pub fn new(pixels: u64) -> Self {
        let total = pixels.div_ceil(UNIT).clamp(1, Semaphore::MAX_PERMITS as u64) as u32;
        Self {
            units: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Waits until `pixels` fit, and holds them until the permit is dropped. An image
    /// larger than the whole budget waits for all of it.
    pub async fn hold(&self, pixels: u64) -> OwnedSemaphorePermit {
        let units = pixels.div_ceil(UNIT).clamp(1, self.total as u64) as u32;
        self.units
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("the pixel budget is never closed")
    }

    /// Pixels not held now.
    pub fn available(&self) -> u64 {
        self.units.available_permits() as u64 * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_what_an_image_needs_and_gives_it_back() {
        let budget = PixelBudget::new(10 * UNIT);
        let big = budget.hold(6 * UNIT).await;
        let small = budget.hold(1).await;
        assert_eq!(budget.available(), 3 * UNIT);
        // Another big one waits until the first is done.
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.hold(6 * UNIT).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(big);
        let second = waiting.await.unwrap();
        assert_eq!(budget.available(), 3 * UNIT);
        drop((second, small));
        assert_eq!(budget.available(), 10 * UNIT);
        // Larger than the budget: all of it, not a wait for ever.
        let whole = budget.hold(100 * UNIT).await;
        assert_eq!(budget.available(), 0);
        drop(whole);
    }
}
