// SyncbnMpiAllSum: the MPI communicator's sum as a TensorFlow CPU kernel.
//
// The same protocol as the mpi4py path in mpi.py, without a trip through
// Python for every collective: the payload is [fingerprint, fingerprint^2,
// tensor...], summed with MPI_Iallreduce on the communicator whose handle
// (mpi4py's `MPI._handleof(comm)`) is the `comm` attribute, and polled against
// a deadline. A fingerprint mismatch fails the op; a deadline abandons the job
// with MPI_Abort, because a pending request cannot be cancelled.
//
// Built on first use by syncbn/collectives/mpi_op.py with the compiler flags of
// the installed TensorFlow and of `mpicxx`.

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace syncbn {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

constexpr int kTimeoutExitCode = 124;
// Same polling policy as the Python path: spin on MPI_Test first, since the
// other ranks usually arrive within microseconds, then yield between polls.
constexpr double kSpinSeconds = 2e-3;
constexpr auto kPollInterval = std::chrono::microseconds(100);

REGISTER_OP("SyncbnMpiAllSum")
    .Input("tensor: T")
    .Output("sum: T")
    .Attr("T: {float, double}")
    .Attr("comm: int")
    .Attr("fingerprint: float")
    .Attr("timeout_seconds: float")
    .Attr("call_name: string")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::UnchangedShape);

template <typename T>
MPI_Datatype MpiType();
template <>
MPI_Datatype MpiType<float>() { return MPI_FLOAT; }
template <>
MPI_Datatype MpiType<double>() { return MPI_DOUBLE; }

template <typename T>
class MpiAllSumOp : public OpKernel {
 public:
  explicit MpiAllSumOp(OpKernelConstruction* context) : OpKernel(context) {
    tensorflow::int64 handle;
    OP_REQUIRES_OK(context, context->GetAttr("comm", &handle));
    comm_ = reinterpret_cast<MPI_Comm>(static_cast<intptr_t>(handle));
    OP_REQUIRES_OK(context, context->GetAttr("fingerprint", &fingerprint_));
    OP_REQUIRES_OK(context, context->GetAttr("timeout_seconds", &timeout_seconds_));
    OP_REQUIRES_OK(context, context->GetAttr("call_name", &call_name_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& input = context->input(0);
    const auto values = input.flat<T>();
    const int64_t count = values.size();
    std::vector<T> send(count + 2), received(count + 2);
    send[0] = static_cast<T>(fingerprint_);
    send[1] = static_cast<T>(fingerprint_) * static_cast<T>(fingerprint_);
    std::copy(values.data(), values.data() + count, send.begin() + 2);

    MPI_Request request;
    int status = MPI_Iallreduce(send.data(), received.data(), static_cast<int>(count + 2),
                                MpiType<T>(), MPI_SUM, comm_, &request);
    OP_REQUIRES(context, status == MPI_SUCCESS,
                tensorflow::errors::Internal("syncbn: MPI_Iallreduce failed at '",
                                             call_name_, "' with MPI error ", status));
    Wait(&request);

    int size = 0;
    MPI_Comm_size(comm_, &size);
    const T expected = static_cast<T>(fingerprint_) * static_cast<T>(size);
    const T expected_square =
        static_cast<T>(fingerprint_) * static_cast<T>(fingerprint_) * static_cast<T>(size);
    OP_REQUIRES(context, received[0] == expected && received[1] == expected_square,
                tensorflow::errors::FailedPrecondition(
                    "syncbn: ranks reached different sync BN layers: this rank was at '",
                    call_name_,
                    "'. Every rank must call the layers in the same order and the same "
                    "number of times."));

    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, input.shape(), &output));
    std::copy(received.begin() + 2, received.end(), output->flat<T>().data());
  }

 private:
  void Wait(MPI_Request* request) {
    using Clock = std::chrono::steady_clock;
    const auto start = Clock::now();
    const auto spin_until = start + std::chrono::duration<double>(kSpinSeconds);
    const auto deadline = start + std::chrono::duration<double>(timeout_seconds_);
    int done = 0;
    MPI_Test(request, &done, MPI_STATUS_IGNORE);
    while (!done) {
      const auto now = Clock::now();
      if (now > deadline) {
        std::fprintf(stderr,
                     "syncbn: MPI all-reduce '%s' waited more than %.0f s "
                     "(SYNCBN_COLLECTIVE_TIMEOUT) for the other ranks; one of them has "
                     "died or is stuck. Aborting the MPI job.\n",
                     call_name_.c_str(), timeout_seconds_);
        std::fflush(stderr);
        MPI_Abort(comm_, kTimeoutExitCode);
      }
      if (now > spin_until) {
        std::this_thread::sleep_for(kPollInterval);
      } else {
        std::this_thread::yield();
      }
      MPI_Test(request, &done, MPI_STATUS_IGNORE);
    }
  }

  MPI_Comm comm_;
  float fingerprint_;
  float timeout_seconds_;
  std::string call_name_;
};

REGISTER_KERNEL_BUILDER(
    Name("SyncbnMpiAllSum").Device(DEVICE_CPU).TypeConstraint<float>("T"),
    MpiAllSumOp<float>);
REGISTER_KERNEL_BUILDER(
    Name("SyncbnMpiAllSum").Device(DEVICE_CPU).TypeConstraint<double>("T"),
    MpiAllSumOp<double>);

}  // namespace syncbn
