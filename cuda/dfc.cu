// DFC attention's gate (src/nn/ghost.rs): out * upsample(sigmoid(BN(g))) where g is the
// half-resolution output of the short_conv's last conv. The last BN's apply, the sigmoid, the
// nearest upsample and the product run in one pass at full resolution (the BN statistics come
// from bn_stats_* on g, a half-resolution tensor); backward is one pass per half-resolution
// pixel that writes d_out for the outputs it feeds and the gradient wrt BN(g)'s input of the
// sigmoid, i.e. d(bn output), ready for BN backward. Same f32 arithmetic as the unfused ops.

__device__ __forceinline__ float dfc_gate(float gv, float center, float scale, float shift) {
  const float a = (gv - center) * scale + shift;
  return 1.0f / (1.0f + expf(-a));
}

// y[n,c,oy,ox] = out[n,c,oy,ox] * sigmoid(bn(g[n,c,iy[oy],ix[ox]])).
extern "C" __global__ void dfc_gate_fwd(const float* __restrict__ out, const float* __restrict__ g,
                                        const float* __restrict__ center,
                                        const float* __restrict__ scale,
                                        const float* __restrict__ shift,
                                        const int* __restrict__ iy, const int* __restrict__ ix,
                                        float* __restrict__ y, int N, int C, int H, int W,
                                        int h, int w) {
  const long long total = (long long)N * C * H * W;
  GS_LOOP(i, total) {
    const int ox = (int)(i % W);
    const int oy = (int)((i / W) % H);
    const long long nc = i / ((long long)H * W);
    const int c = (int)(nc % C);
    const float s = dfc_gate(g[(nc * h + iy[oy]) * w + ix[ox]], center[c], scale[c], shift[c]);
    y[i] = out[i] * s;
  }
}

// One thread per half-resolution pixel (n, c, sy, sx): its outputs are rows [ry0, ry1) x
// columns [rx0, rx1). d_out = gy * s there; d_a = (sum gy * out) * s (1 - s) with a = bn(g).
extern "C" __global__ void dfc_gate_bwd(const float* __restrict__ gy, const float* __restrict__ out,
                                        const float* __restrict__ g,
                                        const float* __restrict__ center,
                                        const float* __restrict__ scale,
                                        const float* __restrict__ shift,
                                        const int* __restrict__ ry0, const int* __restrict__ ry1,
                                        const int* __restrict__ rx0, const int* __restrict__ rx1,
                                        float* __restrict__ d_out, float* __restrict__ d_a,
                                        int N, int C, int H, int W, int h, int w) {
  const long long total = (long long)N * C * h * w;
  GS_LOOP(i, total) {
    const int sx = (int)(i % w);
    const int sy = (int)((i / w) % h);
    const long long nc = i / ((long long)h * w);
    const int c = (int)(nc % C);
    const float s = dfc_gate(g[i], center[c], scale[c], shift[c]);
    const long long base = nc * H * W;
    float acc = 0.0f;
    for (int oy = ry0[sy]; oy < ry1[sy]; ++oy) {
      for (int ox = rx0[sx]; ox < rx1[sx]; ++ox) {
        const long long o = base + (long long)oy * W + ox;
        const float gv = gy[o];
        acc += gv * out[o];
        d_out[o] = gv * s;
      }
    }
    d_a[i] = acc * (s * (1.0f - s));
  }
}
