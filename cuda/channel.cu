// Channel slicing and channel shuffle (src/ops/channel.rs: ShuffleNetV2's split and shuffle):
// pure copies, one thread per output element, grid-stride over the whole tensor.

// y [N, len, HW] = channels start..start+len of x [N, C, HW].
extern "C" __global__ void slice_channels_fwd(const float* __restrict__ x, float* __restrict__ y,
                                              int N, int C, int start, int len, long long HW) {
  const long long per = (long long)len * HW;
  GS_LOOP(i, (long long)N * per) {
    const long long n = i / per, r = i - n * per;
    y[i] = x[(n * C + start) * HW + r];
  }
}

// dx [N, C, HW]: gy in channels start..start+len, zero elsewhere.
extern "C" __global__ void slice_channels_bwd(const float* __restrict__ gy, float* __restrict__ dx,
                                              int N, int C, int start, int len, long long HW) {
  GS_LOOP(i, (long long)N * C * HW) {
    const long long p = i % HW, nc = i / HW;
    const int c = (int)(nc % C) - start;
    const long long n = nc / C;
    dx[i] = (c >= 0 && c < len) ? gy[(n * len + c) * HW + p] : 0.0f;
  }
}

// torchvision's channel_shuffle: output channel j reads input channel (j % g) * (C / g) + j / g.
// Its inverse is the shuffle with C / g groups (the backward).
extern "C" __global__ void channel_shuffle_fwd(const float* __restrict__ x, float* __restrict__ y,
                                               int N, int C, int groups, long long HW) {
  const int per = C / groups;
  GS_LOOP(i, (long long)N * C * HW) {
    const long long p = i % HW, nc = i / HW;
    const int j = (int)(nc % C);
    const long long n = nc / C;
    const int src = (j % groups) * per + j / groups;
    y[i] = x[(n * C + src) * HW + p];
  }
}
