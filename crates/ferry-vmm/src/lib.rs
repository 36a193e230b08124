//! ferry's reference VMM.
