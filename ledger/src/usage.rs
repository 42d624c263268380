//! TODO(owner): usage
