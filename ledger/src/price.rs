//! TODO(owner): price
