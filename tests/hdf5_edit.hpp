#pragma once
// Editing a snapshot's datasets in place from a test (the HDF5 C API, as a corrupting tool would).
#include <doctest/doctest.h>

#include <hdf5.h>

namespace mbtest {

/// Overwrites row `row` of the 2-D dataset `name` with `count` elements at `data`, of memory type
/// `memtype` (0: the dataset's own type, raw). HDF5 recomputes the chunk's checksum: only the values
/// are wrong.
inline void write_dataset_row(hid_t f, const char* name, hsize_t row, hsize_t count, hid_t memtype,
                              const void* data) {
  const hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
  REQUIRE(d >= 0);
  const hid_t own = H5Dget_type(d);
  const hid_t fs = H5Dget_space(d);
  const hsize_t start[2] = {row, 0}, counts[2] = {1, count};
  H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, nullptr, counts, nullptr);
  const hid_t ms = H5Screate_simple(2, counts, nullptr);
  REQUIRE(H5Dwrite(d, memtype != 0 ? memtype : own, ms, fs, H5P_DEFAULT, data) >= 0);
  H5Sclose(ms);
  H5Sclose(fs);
  H5Tclose(own);
  H5Dclose(d);
}

}  // namespace mbtest
