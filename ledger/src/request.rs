//! TODO(owner): request
